"""Triton forward of multi-scale deformable attention, and the bilinear helpers the backward shares.

One program owns BLOCK_R (query, head) rows of one batch element and all D channels of each row.
"""

import triton
import triton.language as tl

from .autotune import prune_row_configs, row_configs


@triton.jit
def bilinear_point(loc_ptr, attn_ptr, point, row_mask, H, W):
    """Load one sampling point per row and return its corner (x0, y0), fractions (lx, ly), attention weight.

    align_corners=False: pixel centres sit at (i + 0.5) / W, so x = loc_x * W - 0.5. Computed once per point,
    shared by all D channels. Coordinates are clamped to [-2, W+1] so far-away points cannot overflow int32;
    every corner of a clamped point is outside the image, so it contributes zero either way.
    """
    loc_x = tl.load(loc_ptr + 2 * point, mask=row_mask, other=0.0).to(tl.float32)
    loc_y = tl.load(loc_ptr + 2 * point + 1, mask=row_mask, other=0.0).to(tl.float32)
    a = tl.load(attn_ptr + point, mask=row_mask, other=0.0).to(tl.float32)
    x = tl.clamp(loc_x * W.to(tl.float32) - 0.5, -2.0, W.to(tl.float32) + 1.0)
    y = tl.clamp(loc_y * H.to(tl.float32) - 0.5, -2.0, H.to(tl.float32) + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f, a


@triton.jit
def corner(xc, yc, H, W, start, head, M, row_mask):
    """Row offset (in units of D) of a corner pixel in value (S, M, D) and whether it lies inside the image."""
    inside = row_mask & (xc >= 0) & (xc < W) & (yc >= 0) & (yc < H)
    return ((start + yc * W + xc) * M + head), inside


@triton.jit
def load_corner(value_ptr, vrow, inside, d, d_mask, D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) tile of value rows, zero outside the image (zero padding). Channels are contiguous."""
    ptrs = value_ptr + vrow[:, None] * D + d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.autotune(
    configs=row_configs(),
    key=["n_rows", "D", "L", "P"],  # the autotuner appends every tensor argument's dtype to the key
    prune_configs_by={"early_config_prune": prune_row_configs},
)
@triton.jit
def msda_fwd_kernel(
    value_ptr,  # (N, S, M, D)
    shapes_ptr,  # (L, 2) int64 (H, W)
    starts_ptr,  # (L,) int64
    loc_ptr,  # (N, Lq, M, L, P, 2)
    attn_ptr,  # (N, Lq, M, L, P)
    out_ptr,  # (N, Lq, M*D) == rows (N, Lq*M) of D
    n_rows,  # Lq * M
    S,
    M,
    D: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = q * M + head
    row_mask = rows < n_rows
    head = rows % M
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    value_ptr += n * S * M * D
    first_point = (n * n_rows + rows) * (L * P)  # index of (n, q, head, level 0, point 0)

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(L):
        H = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for p in tl.static_range(P):
            x0, y0, lx, ly, a = bilinear_point(loc_ptr, attn_ptr, first_point + level * P + p, row_mask, H, W)
            r00, in00 = corner(x0, y0, H, W, start, head, M, row_mask)
            r01, in01 = corner(x0 + 1, y0, H, W, start, head, M, row_mask)
            r10, in10 = corner(x0, y0 + 1, H, W, start, head, M, row_mask)
            r11, in11 = corner(x0 + 1, y0 + 1, H, W, start, head, M, row_mask)
            # attention weight folded into the four bilinear weights: 4 FMAs per channel per point
            w00 = a * (1 - ly) * (1 - lx)
            w01 = a * (1 - ly) * lx
            w10 = a * ly * (1 - lx)
            w11 = a * ly * lx
            acc += w00[:, None] * load_corner(value_ptr, r00, in00, d, d_mask, D)
            acc += w01[:, None] * load_corner(value_ptr, r01, in01, d, d_mask, D)
            acc += w10[:, None] * load_corner(value_ptr, r10, in10, d, d_mask, D)
            acc += w11[:, None] * load_corner(value_ptr, r11, in11, d, d_mask, D)

    out_ptrs = out_ptr + (n * n_rows + rows)[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Launch the forward kernel on contiguous inputs; the output has value's dtype."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_empty(N, Lq, M * D)
    if out.numel() == 0 or S == 0 or L * P == 0:  # nothing to sample
        return out.zero_()
    n_rows = Lq * M
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), N)
    msda_fwd_kernel[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        n_rows, S, M, D=D, L=L, P=P, BLOCK_D=triton.next_power_of_2(D),
    )
    return out
