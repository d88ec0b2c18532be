#!/usr/bin/env bash
# Installs what is needed, then runs the embedded default: synthetic shards -> 2-rank ZeRO-3
# CPU training -> eval -> overlays -> local MLflow. Extra arguments go to `launcher demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m launcher demo "$@"
