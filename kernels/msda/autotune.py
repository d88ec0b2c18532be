"""Autotuning configs for the MSDA kernels: block sizes, warps and stages, keyed on the shape.

Under TRITON_INTERPRET=1 (CPU) multi-config tuning cannot benchmark, so the configs are pruned to one.
"""

import triton
from triton import knobs

# Rows are (query, head) pairs; each program keeps a (BLOCK_R, D) fp32 accumulator in registers.
_ROW_BLOCKS = (16, 32, 64, 128)
_WARPS = (2, 4, 8)
_STAGES = (1, 2, 3)

# One modest config for the interpreter: small enough that per-program numpy work stays cheap.
INTERPRETER_CONFIG = triton.Config({"BLOCK_R": 16}, num_warps=4, num_stages=1)


def row_configs():
    """All (BLOCK_R, warps, stages) combinations the row kernels are tuned over."""
    return [
        triton.Config({"BLOCK_R": r}, num_warps=w, num_stages=s) for r in _ROW_BLOCKS for w in _WARPS for s in _STAGES
    ]


def prune_row_configs(configs, named_args, **kwargs):
    """Keep configs whose tile fits the problem; keep exactly one when interpreting.

    A (BLOCK_R, BLOCK_D) fp32 tile over num_warps*32 threads: past ~32 values per thread, the accumulator
    plus four corner tiles in flight spill registers.
    """
    if knobs.runtime.interpret:
        return [INTERPRETER_CONFIG]
    args = {**named_args, **kwargs}
    n_rows, block_d = args["n_rows"], args["BLOCK_D"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_R"] <= max(16, triton.next_power_of_2(n_rows))
        and c.kwargs["BLOCK_R"] * block_d // (c.num_warps * 32) <= 32
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"])]


def gather_configs():
    """Configs for the deterministic grad_value gather (rows are value pixels x heads)."""
    return [triton.Config({"BLOCK_V": v}, num_warps=w, num_stages=1) for v in (16, 32, 64) for w in (2, 4, 8)]


def prune_gather_configs(configs, named_args, **kwargs):
    if knobs.runtime.interpret:
        return [triton.Config({"BLOCK_V": 16}, num_warps=4, num_stages=1)]
    return configs
