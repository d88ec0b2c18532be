"""Readable PyTorch multi-scale deformable attention built on grid_sample: the CPU path and the oracle.

It stores ~N*Lq*M*L*P*D sampled values for backward, which is what the Triton kernels avoid.
"""

import torch
import torch.nn.functional as F


def _levels(value, spatial_shapes, level_start_index):
    """Yield (level, H, W, value of that level as (N*M, D, H, W))."""
    N, _, M, D = value.shape
    for level, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        value_l = value[:, start : start + H * W]  # (N, H*W, M, D)
        yield level, H, W, value_l.permute(0, 2, 3, 1).reshape(N * M, D, H, W)


def _grid(sampling_locations, level):
    """Sampling points of one level as a grid_sample grid (N*M, Lq, P, 2) in [-1, 1]."""
    loc = sampling_locations[:, :, :, level]  # (N, Lq, M, P, 2)
    return (2 * loc - 1).transpose(1, 2).flatten(0, 1)


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1],
    attention_weights (N, Lq, M, L, P) -> (N, Lq, M*D). Bilinear, zero padding, align_corners=False."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sampled = []
    for level, H, W, value_l in _levels(value, spatial_shapes, level_start_index):
        grid = _grid(sampling_locations, level)
        # (N*M, D, Lq, P): one D-vector per query, head and point -- the big intermediate.
        sampled.append(F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (sampled * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


def ms_deform_attn_reference_backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Gradients (value, sampling_locations, attention_weights) of the reference, written out with aten's
    grid_sample backward so that it can run inside a custom op (where autograd does not record)."""
    N, _, M, D = value.shape
    _, Lq, _, _, P, _ = sampling_locations.shape
    grad_out = grad_output.view(N, Lq, M, D).permute(0, 2, 3, 1).reshape(N * M, D, Lq, 1)
    grad_value = torch.zeros_like(value)
    grad_loc = torch.zeros_like(sampling_locations)
    grad_attn = torch.zeros_like(attention_weights)
    for level, H, W, value_l in _levels(value, spatial_shapes, level_start_index):
        grid = _grid(sampling_locations, level)
        sampled = F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(N * M, 1, Lq, P)
        # d out / d attention_weight = <grad_out, sampled value>
        g_attn = (grad_out * sampled).sum(1)  # (N*M, Lq, P)
        grad_attn[:, :, :, level] = g_attn.view(N, M, Lq, P).transpose(1, 2)
        # d out / d sampled value = grad_out * attention_weight, pushed through bilinear sampling
        g_value_l, g_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_out * weights, value_l, grid, 0, 0, False, [True, True]
        )  # interpolation 0 = bilinear, padding 0 = zeros, align_corners False
        start = level_start_index[level].item()
        grad_value[:, start : start + H * W] = g_value_l.view(N, M, D, H * W).permute(0, 3, 1, 2)
        grad_loc[:, :, :, level] = 2 * g_grid.view(N, M, Lq, P, 2).transpose(1, 2)  # grid = 2*loc - 1
    return grad_value, grad_loc, grad_attn
