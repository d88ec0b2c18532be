"""Multi-scale deformable attention: Triton forward/backward kernels, a grid_sample reference, one custom op.

Use `ms_deform_attn`; see kernels/README.md for the roofline, targets and the benchmark command.
"""

from .op import fused_prologue_reference, ms_deform_attn, ms_deform_attn_fused
from .reference import ms_deform_attn_reference, ms_deform_attn_reference_backward

__all__ = ["ms_deform_attn", "ms_deform_attn_fused", "fused_prologue_reference", "ms_deform_attn_reference", "ms_deform_attn_reference_backward"]
