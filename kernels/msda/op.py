"""ms_deform_attn (and its fused-prologue form): backend dispatch, the torch.library custom ops and autograd.

Registered as segcap::ms_deform_attn(_backward) and segcap::ms_deform_attn_fused, so torch.compile keeps each
as one opaque node instead of breaking the graph. Kernels compute in fp32 whatever the input dtypes. The ops
make their inputs contiguous themselves (a direct call with strided tensors is still correct), and the Python
entry points check shapes, with spatial_shapes checked against value's length whenever it is on the CPU.
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


def _contiguous(*tensors):
    """Kernels index raw pointers: strided inputs (a direct call of the registered op) are made contiguous here."""
    return tuple(t.contiguous() for t in tensors)


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
    return _triton_kernels()[0].msda_forward(*_contiguous(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ))


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
    return _triton_kernels()[1].msda_backward(*_contiguous(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ), deterministic)


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


def validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    """Shape checks before launch. spatial_shapes and level_start_index are checked against value's length only
    when they are on the CPU and in eager mode (free there; on the GPU it would cost a sync): the kernels also skip any level whose
    pixels fall outside value, so inconsistent device-side shapes give zeros for that level, never a wild read."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if value.dim() != 4:
        raise ValueError(f"value {tuple(value.shape)} is not (N, S, M, D)")
    N, S, M, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point():
        raise ValueError(f"spatial_shapes must be an integer (L, 2) tensor of (H, W), got {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(f"level_start_index {tuple(level_start_index.shape)} is not ({L},)")
    loc_shape = sampling_locations.shape
    if len(loc_shape) != 6 or loc_shape[0] != N or loc_shape[2] != M or loc_shape[3] != L or loc_shape[5] != 2:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} is not (N={N}, Lq, M={M}, L={L}, P, 2)")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} != {tuple(sampling_locations.shape[:-1])}")
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():  # data-dependent: eager only
        areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        if int(areas.sum()) != S:
            raise ValueError(f"spatial_shapes {spatial_shapes.tolist()} cover {int(areas.sum())} pixels but value has "
                             f"S={S} (value (N, S, M, D) must hold every level's H*W pixels)")
        if level_start_index.device.type == "cpu":
            expected = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
            if not torch.equal(level_start_index.to(expected.dtype), expected):
                raise ValueError(f"level_start_index {level_start_index.tolist()} != the levels' offsets "
                                 f"{expected.tolist()} from spatial_shapes")


def _resolve(value, backend, deterministic):
    if backend == "auto":
        backend = "triton" if value.is_cuda else "reference"
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return backend, deterministic


def _index_tensors(value, spatial_shapes, level_start_index):
    return (spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous(),
            level_start_index.to(device=value.device, dtype=torch.int64).contiguous())


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
    deterministic: backward without floating-point atomics (bit-identical across runs and processes; slower,
    more memory, see kernels/README.md). None follows torch.are_deterministic_algorithms_enabled().
    """
    validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
    backend, deterministic = _resolve(value, backend, deterministic)
    return _forward_op(
        value.contiguous(),
        *_index_tensors(value, spatial_shapes, level_start_index),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        backend,
        deterministic,
    )


def fused_prologue_reference(spatial_shapes, reference_points, offsets, logits):
    """The pixel decoder's prologue in PyTorch: locations = reference + offsets / (W, H) of each level, weights =
    softmax of each (query, head)'s L*P logits. What the fused kernel computes in registers."""
    n, lq, m, lv, p, _ = offsets.shape
    # softmax over dim -2 of the transposed view: much faster on CPU than over a short last dim
    weights = logits.reshape(n, lq, m, lv * p).transpose(-1, -2).softmax(-2).transpose(-1, -2).reshape(n, lq, m, lv, p)
    normalizer = spatial_shapes.flip(-1).to(device=offsets.device, dtype=offsets.dtype)  # (L, 2) as (W, H)
    loc = reference_points[None, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return loc, weights


@torch.library.custom_op("segcap::ms_deform_attn_fused", mutates_args=())
def _fused_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference_points: Tensor,
    offsets: Tensor,
    logits: Tensor,
    deterministic: bool,
) -> Tensor:
    _check_device(value)
    value, spatial_shapes, level_start_index, reference_points, offsets, logits = _contiguous(
        value, spatial_shapes, level_start_index, reference_points, offsets, logits)
    return _triton_kernels()[0].msda_forward(
        value, spatial_shapes, level_start_index, offsets, logits, reference_points=reference_points)


@_fused_op.register_fake
def _(value, spatial_shapes, level_start_index, reference_points, offsets, logits, deterministic):
    N, _, M, D = value.shape
    return value.new_empty(N, offsets.shape[1], M * D)


def _fused_setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, reference_points, offsets, logits, deterministic = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, reference_points, offsets, logits)
    ctx.deterministic = deterministic


def _fused_backward(ctx, grad_output):
    """Recomputes the prologue in PyTorch (locations and weights exist only during backward), runs the unfused
    backward kernel, then chains through the prologue: d loc / d offset = 1 / (W, H), softmax's Jacobian."""
    value, spatial_shapes, level_start_index, reference_points, offsets, logits = ctx.saved_tensors
    loc, weights = fused_prologue_reference(spatial_shapes, reference_points, offsets.float(), logits.float())
    grad_value, grad_loc, grad_attn = _backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, loc, weights, "triton",
        ctx.deterministic,
    )
    normalizer = spatial_shapes.flip(-1).to(grad_loc.dtype)
    grad_offsets = grad_loc / normalizer[None, None, None, :, None, :]
    grad_ref = grad_loc.sum(dim=(0, 2, 3, 4)) if ctx.needs_input_grad[3] else None
    n, lq, m, lv, p = weights.shape
    a, ga = weights.reshape(n, lq, m, lv * p), grad_attn.reshape(n, lq, m, lv * p)
    grad_logits = (a * (ga - (a * ga).sum(-1, keepdim=True))).reshape(n, lq, m, lv, p)
    return (grad_value, None, None, None if grad_ref is None else grad_ref.to(reference_points.dtype),
            grad_offsets.to(offsets.dtype), grad_logits.to(logits.dtype), None)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def ms_deform_attn_fused(
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    offsets,
    logits,
    *,
    backend="auto",
    deterministic=None,
):
    """ms_deform_attn with the pixel decoder's prologue inside: reference_points (Lq, 2) in [0, 1], offsets
    (N, Lq, M, L, P, 2) in pixels of each level, logits (N, Lq, M, L, P) softmaxed over each row's L*P.

    Triton: one kernel reads offsets and logits and never writes locations or weights (the fp32 locations
    alone are ~39% of the bf16 forward's compulsory bytes). Reference: fused_prologue_reference, then
    ms_deform_attn, autograd through both: the oracle the fused kernel is tested against.
    """
    if reference_points.dim() != 2 or reference_points.shape[1] != 2 or reference_points.shape[0] != offsets.shape[1]:
        raise ValueError(f"reference_points {tuple(reference_points.shape)} is not (Lq={offsets.shape[1]}, 2)")
    validate(value, spatial_shapes, level_start_index, offsets, logits, backend)
    backend, deterministic = _resolve(value, backend, deterministic)
    if backend == "reference":
        loc, weights = fused_prologue_reference(spatial_shapes, reference_points, offsets, logits)
        return ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights, backend="reference",
                              deterministic=deterministic)
    return _fused_op(
        value.contiguous(),
        *_index_tensors(value, spatial_shapes, level_start_index),
        reference_points.to(value.device).contiguous(),
        offsets.contiguous(),
        logits.contiguous(),
        deterministic,
    )
