"""ms_deform_attn: backend dispatch, plus the torch.library custom ops and autograd behind it.

Registered as segcap::ms_deform_attn and segcap::ms_deform_attn_backward, so torch.compile keeps each as one
opaque node instead of breaking the graph. Kernels compute in fp32 whatever the input dtypes.
"""

import torch
from torch import Tensor

from .reference import ms_deform_attn_reference, ms_deform_attn_reference_backward

BACKENDS = ("auto", "triton", "reference")


def _triton_kernels():
    """Import the Triton kernels on first use: @triton.jit picks the CPU interpreter when the module is imported
    (TRITON_INTERPRET=1), and an install without Triton still has the reference."""
    from triton.runtime.interpreter import InterpretedFunction

    from . import triton_bwd, triton_fwd

    return triton_fwd, triton_bwd, isinstance(triton_fwd.msda_fwd_kernel.fn, InterpretedFunction)


def _check_device(value):
    if value.is_cuda:
        return
    interpreted = _triton_kernels()[2]
    if not interpreted:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "kernels.msda's Triton kernels are first used (they are compiled for the interpreter at import)."
        )


def _compute_dtype(value):
    """The reference computes in fp32 (fp64 stays fp64): grid_sample needs one dtype and sums in it."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32


@torch.library.custom_op("segcap::ms_deform_attn", mutates_args=())
def _forward_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
    deterministic: bool,
) -> Tensor:
    if backend == "reference":
        dt = _compute_dtype(value)
        out = ms_deform_attn_reference(
            value.to(dt), spatial_shapes, level_start_index, sampling_locations.to(dt), attention_weights.to(dt)
        )
        return out.to(value.dtype)
    _check_device(value)
    return _triton_kernels()[0].msda_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_forward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, deterministic):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("segcap::ms_deform_attn_backward", mutates_args=())
def _backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "reference":  # grid_sample's backward is deterministic on CPU; on CUDA it uses atomics
        dt = _compute_dtype(value)
        grads = ms_deform_attn_reference_backward(
            grad_output.to(dt), value.to(dt), spatial_shapes, level_start_index,
            sampling_locations.to(dt), attention_weights.to(dt),
        )
        inputs = (value, sampling_locations, attention_weights)
        return tuple(g.to(x.dtype) for g, x in zip(grads, inputs))
    _check_device(value)
    return _triton_kernels()[1].msda_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic
    )


@_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend,
      deterministic):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, deterministic = inputs
    # Only the inputs are kept for backward: no per-sample intermediates (the grid_sample path keeps N*Lq*M*L*P*D).
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend, ctx.deterministic = backend, deterministic


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        ctx.backend, ctx.deterministic,
    )
    return grad_value, None, None, grad_loc, grad_attn, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    *,
    backend="auto",
    deterministic=None,
):
    """Multi-scale deformable attention (Deformable DETR): bilinear, zero padding, align_corners=False.

    value (N, S, M, D); spatial_shapes (L, 2) int64 as (H, W); level_start_index (L,);
    sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P)
    -> (N, Lq, M*D) in value's dtype.
    backend: "triton", "reference" or "auto" (Triton on CUDA tensors, the reference on CPU).
    deterministic: backward without floating-point atomics (bit-identical across runs; slower, more memory,
    see kernels/README.md). None follows torch.are_deterministic_algorithms_enabled().
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    N, _, M, _ = value.shape
    L = spatial_shapes.shape[0]
    loc_shape = sampling_locations.shape
    if len(loc_shape) != 6 or loc_shape[0] != N or loc_shape[2] != M or loc_shape[3] != L or loc_shape[5] != 2:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} is not (N={N}, Lq, M={M}, L={L}, P, 2)")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} != {tuple(sampling_locations.shape[:-1])}")
    if backend == "auto":
        backend = "triton" if value.is_cuda else "reference"
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _forward_op(
        value.contiguous(),
        spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous(),
        level_start_index.to(device=value.device, dtype=torch.int64).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        backend,
        deterministic,
    )
