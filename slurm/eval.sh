#!/usr/bin/env bash
# Evaluate a run's latest checkpoint on 1 node x 8 GPUs, one task per GPU.
#   sbatch slurm/eval.sh [--config configs/train/stage2.yaml] [key=value ...]    (from the repo root)
# The run dir is the one the same config trained into (runs/stage2 for the default); name another
# with SEGCAP_RUN_DIR=... or train.output_dir=...
#SBATCH --job-name=segcap-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=4:00:00
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
segcap_launcher eval configs/train/stage2.yaml "$@"
