#!/usr/bin/env bash
# Installs segcap on a GPU node: the CUDA torch wheel, a prebuilt flash-attn wheel, and DeepSpeed with
# its CUDA ops compiled here, once, so that no rank JIT-compiles at start (FusedAdam, which the rendered
# config uses on GPUs, and the quantizer ZeRO++'s quantised weights/gradients need). Idempotent.
#
#   CUDA_TAG=cu128 bash scripts/install_gpu.sh          # the torch wheel index for the node's CUDA
#   FLASH_ATTN_WHEEL=/path/or/url.whl bash scripts/install_gpu.sh   # a wheel built for this torch/CUDA/Python
#
# Run it on a node of the kind that trains (the ops are compiled for its GPUs: TORCH_CUDA_ARCH_LIST
# defaults to A100 8.0 and H100/H200 9.0). Not run by CI (no GPU there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CUDA_TAG=${CUDA_TAG:-cu128}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
FLASH_ATTN_VERSION=${FLASH_ATTN_VERSION:-2.8.3}
# ZeRO-3 with gradient checkpointing and frozen parameters (LoRA, frozen towers) crashed in backward
# ("Recomputed values ... saved shape [N] vs recomputed [0]", transformers#47254, DeepSpeed 0.19.2) until
# DeepSpeed PR #8148; 0.19.8 holds that fix (ds_recompute_parameters in partitioned_param_coordinator.py).
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed>=0.19.8,<0.20}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! command -v nvcc >/dev/null 2>&1; then
    echo "install_gpu.sh: nvcc not found: load the CUDA toolkit (module load cuda) so DeepSpeed's ops can be built" >&2
    exit 1
fi

pip_install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"
pip_install setuptools wheel ninja packaging psutil

# flash-attn: a prebuilt wheel only. Its setup.py fetches the release wheel matching torch/CUDA/Python
# and would otherwise compile for an hour; FLASH_ATTENTION_FORCE_BUILD=FALSE keeps it from doing so.
if [[ -n "${FLASH_ATTN_WHEEL:-}" ]]; then
    pip_install --no-deps "${FLASH_ATTN_WHEEL}"
else
    FLASH_ATTENTION_FORCE_BUILD=FALSE MAX_JOBS=4 pip_install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"
fi

# DeepSpeed's ops compiled at install time (DS_BUILD_*=1), never at a rank's start.
DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_QUANTIZER=1 DS_BUILD_CPU_ADAM=0 \
    pip_install --no-build-isolation --no-cache-dir "${DEEPSPEED_SPEC}"

pip_install -e ".[dev]"

# Fail here, not in a job: CUDA visible, flash-attn importable, the ops installed prebuilt.
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
import flash_attn  # noqa: F401
import deepspeed
from deepspeed.git_version_info import installed_ops
missing = [op for op in ("fused_adam", "quantizer") if not installed_ops.get(op)]
assert not missing, f"DeepSpeed ops not prebuilt: {missing} (they would JIT-compile on every rank)"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), flash-attn {flash_attn.__version__}, deepspeed {deepspeed.__version__}: ops {sorted(k for k, v in installed_ops.items() if v)}")
EOF
