#!/usr/bin/env bash
# Installs what the MLflow tests need from Debian's packages: PostgreSQL (the tracking server's backend
# store, tests/mlflow_stack.py) and Chromium with its WebDriver (the browser test of the MLflow UI).
# Idempotent and quiet: does nothing when all are installed. Needs root; without it those tests skip
# (under CI=true they fail).
set -euo pipefail
packages=(postgresql chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install_services.sh: cannot install ${missing[*]} (needs root and apt-get); the MLflow server and browser tests will skip" >&2
    [[ "${CI:-}" == true ]] && exit 1
    exit 0
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# The package's own cluster and service are not needed: the tests run initdb/pg_ctl in a temp dir.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } </dev/null >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_services.sh: apt-get failed installing ${missing[*]}" >&2
    exit 1
fi
echo "install_services.sh: installed ${missing[*]}"
