#!/usr/bin/env bash
# Any command, once per task, with the launch of the stage scripts (rendezvous env, one task per GPU,
# signal forwarding, requeue on exit 3). Give the shape at submit time, e.g.
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/run.sh python3 my_script.py --arg
#SBATCH --job-name=segcap-run
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this script from its spool dir: find the repo from where sbatch was called.
for SEGCAP_REPO in "${SEGCAP_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.." ""; do
    [[ -f "$SEGCAP_REPO/slurm/common.sh" ]] && break
done
[[ -n "$SEGCAP_REPO" ]] || { echo "slurm/common.sh not found: sbatch from the repo root or export SEGCAP_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$SEGCAP_REPO/slurm/common.sh"
segcap_setup
segcap_launch "$@"
