"""Autotuning for the MSDA kernels: a small config set, a bucketed key, a disk cache, a pin, determinism.

Bounded by design (kernels/README.md "Autotuning"): the kernels have no loop to pipeline, so num_stages is
fixed at 1; (BLOCK_R, warps) is swept over at most 8 configs, pruned to those whose tile fits the registers;
rows enter the key as a power-of-two bucket so a new image or batch size rarely retunes; results persist in
Triton's cache dir (cache_results), so a second process does not tune again.
Environment: SEGCAP_MSDA_CONFIG="BLOCK_R=64,num_warps=4" pins one config (no tuning at all). A deterministic
backward always runs DETERMINISTIC_CONFIG, since tl.sum's reduction order follows (BLOCK_R, num_warps).
Under TRITON_INTERPRET=1 (CPU) tuning cannot benchmark, so the configs are pruned to one.
"""

import os

import triton
from triton import knobs

PIN_ENV = "SEGCAP_MSDA_CONFIG"

# Rows are (query, head) pairs; each program keeps a (BLOCK_R, D) fp32 accumulator in registers.
_ROW_BLOCKS = (16, 32, 64, 128)
_WARPS = (2, 4)

# One modest config for the interpreter: small enough that per-program numpy work stays cheap.
INTERPRETER_CONFIG = triton.Config({"BLOCK_R": 16}, num_warps=4, num_stages=1)
# The one config of the deterministic backward, in every process: fixes the order of its tl.sum reductions.
DETERMINISTIC_CONFIG = triton.Config({"BLOCK_R": 32}, num_warps=4, num_stages=1)


def parse_pin(text):
    """"BLOCK_R=64,num_warps=4" -> triton.Config; a malformed pin is an error naming the variable."""
    fields = {}
    for part in text.split(","):
        name, sep, val = part.partition("=")
        if not sep or name.strip() not in ("BLOCK_R", "num_warps") or not val.strip().isdigit():
            raise ValueError(f"{PIN_ENV}={text!r}: expected 'BLOCK_R=<power of 2>,num_warps=<n>'")
        fields[name.strip()] = int(val)
    block = fields.get("BLOCK_R", 32)
    if block & (block - 1) or block < 1:
        raise ValueError(f"{PIN_ENV}={text!r}: BLOCK_R must be a power of two")
    return triton.Config({"BLOCK_R": block}, num_warps=fields.get("num_warps", 4), num_stages=1)


def pinned_config():
    """The config SEGCAP_MSDA_CONFIG pins, or None. Read at every tuning decision (cheap: once per key)."""
    text = os.environ.get(PIN_ENV, "").strip()
    return parse_pin(text) if text else None


def rows_bucket(n_rows):
    """The autotune key's row count: the next power of two, so Lq*M = 21,504 and 24,000 share one tuning."""
    return triton.next_power_of_2(max(1, int(n_rows)))


def row_configs():
    """(BLOCK_R, warps) combinations the row kernels are tuned over; stages fixed (no loop to pipeline)."""
    return [triton.Config({"BLOCK_R": r}, num_warps=w, num_stages=1) for r in _ROW_BLOCKS for w in _WARPS]


def prune_row_configs(configs, named_args, **kwargs):
    """One config when interpreting, pinned or deterministic; else those whose tile fits the registers.

    A (BLOCK_R, BLOCK_D) fp32 tile over num_warps*32 threads: past ~32 values per thread, the accumulator
    plus four corner tiles in flight spill registers.
    """
    if knobs.runtime.interpret:
        return [INTERPRETER_CONFIG]
    args = {**named_args, **kwargs}
    pin = pinned_config()
    if pin is not None:
        return [pin]
    if args.get("DETERMINISTIC"):
        return [DETERMINISTIC_CONFIG]
    bucket, block_d = args["ROWS_BUCKET"], args["BLOCK_D"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_R"] <= max(16, bucket) and c.kwargs["BLOCK_R"] * block_d // (c.num_warps * 32) <= 32
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"])]


def gather_configs():
    """Configs for the deterministic grad_value gather (rows are value pixels x heads). Its sums run
    sequentially per output element, so every config gives the same bits."""
    return [triton.Config({"BLOCK_V": v}, num_warps=w, num_stages=1) for v in (16, 32, 64) for w in (2, 4)]


def prune_gather_configs(configs, named_args, **kwargs):
    if knobs.runtime.interpret:
        return [triton.Config({"BLOCK_V": 16}, num_warps=4, num_stages=1)]
    return configs
