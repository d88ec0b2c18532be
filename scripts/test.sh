#!/usr/bin/env bash
# Installs what the tests need (Python packages; Slurm, munge, PostgreSQL, Chromium from Debian), then runs the
# whole suite. Extra arguments go to pytest (e.g. -m "not slurm").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_slurm.sh
bash scripts/install_services.sh  # PostgreSQL, Chromium (MLflow server and browser tests)
bash scripts/install_java.sh  # METEOR / PTB tokenizer (launcher/eval)
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
