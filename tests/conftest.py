"""Shared pytest setup. Environment first: these must be set before triton or deepspeed is imported."""

import os

# kernels.msda: Triton kernels run on CPU in the interpreter, chosen when @triton.jit runs at import time.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed on CPU-only machines.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
