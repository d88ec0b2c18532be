#!/usr/bin/env bash
# Installs what the Slurm tests (tests/slurm_cluster.py) need from Debian's packages: slurmctld, slurmd,
# the client commands, munge, iproute2 (ip netns, veth, bridge) and util-linux (nsenter). Idempotent and
# quiet: does nothing when all are installed. Needs root; without it the Slurm tests skip (CI fails).
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge iproute2 util-linux)
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
    echo "install_slurm.sh: cannot install ${missing[*]} (needs root and apt-get); the Slurm tests will skip" >&2
    [[ "${CI:-}" == true ]] && exit 1
    exit 0
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# The packages' own services are not needed (the tests start their daemons with their own config).
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } </dev/null >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_slurm.sh: apt-get failed installing ${missing[*]}" >&2
    exit 1
fi
echo "install_slurm.sh: installed ${missing[*]}"
