#!/usr/bin/env bash
# Stage 2 (joint multi-task LoRA fine-tuning) on 4 nodes x 8 GPUs, one task per GPU.
#   sbatch slurm/stage2.sh [--config configs/train/stage2.yaml] [key=value ...]    (from the repo root)
# Preemption and the time limit end in a checkpoint and a requeue; see docs/SLURM.md.
#SBATCH --job-name=segcap-stage2
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
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
segcap_launcher train configs/train/stage2.yaml "$@"
