"""Triton forward of multi-scale deformable attention, and the bilinear helpers the backward shares.

One program owns BLOCK_R (query, head) rows of one batch element and all D channels of each row. FUSED=True
also does the pixel decoder's prologue in registers: locations from reference points + pixel offsets, and the
softmax of the attention logits, so neither fp32 locations nor weights are written to memory first.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .autotune import prune_row_configs, row_configs, rows_bucket


@triton.jit
def split_point(x, y, H, W):
    """Pixel-space (x, y) -> corner (x0, y0) and fractions (lx, ly). Clamped to [-2, W+1] so far-away points
    cannot overflow int32; every corner of a clamped point is outside the image and contributes zero."""
    x = tl.clamp(x, -2.0, W.to(tl.float32) + 1.0)
    y = tl.clamp(y, -2.0, H.to(tl.float32) + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def bilinear_point(loc_ptr, attn_ptr, point, row_mask, H, W):
    """Load one sampling point per row and return its corner (x0, y0), fractions (lx, ly), attention weight.

    align_corners=False: pixel centres sit at (i + 0.5) / W, so x = loc_x * W - 0.5. Computed once per point,
    shared by all D channels.
    """
    loc_x = tl.load(loc_ptr + 2 * point, mask=row_mask, other=0.0).to(tl.float32)
    loc_y = tl.load(loc_ptr + 2 * point + 1, mask=row_mask, other=0.0).to(tl.float32)
    a = tl.load(attn_ptr + point, mask=row_mask, other=0.0).to(tl.float32)
    x0, y0, lx, ly = split_point(loc_x * W.to(tl.float32) - 0.5, loc_y * H.to(tl.float32) - 0.5, H, W)
    return x0, y0, lx, ly, a


@triton.jit
def fused_point(off_ptr, logit_ptr, point, ref_x, ref_y, row_max, row_inv, row_mask, H, W):
    """bilinear_point for the fused prologue: loc = ref + offset / (W, H) and a = softmax(logits) of the row.
    In pixels, loc * W - 0.5 = ref * W + offset - 0.5: the division never happens."""
    off_x = tl.load(off_ptr + 2 * point, mask=row_mask, other=0.0).to(tl.float32)
    off_y = tl.load(off_ptr + 2 * point + 1, mask=row_mask, other=0.0).to(tl.float32)
    logit = tl.load(logit_ptr + point, mask=row_mask, other=0.0).to(tl.float32)
    a = tl.exp(logit - row_max) * row_inv
    x0, y0, lx, ly = split_point(ref_x * W.to(tl.float32) + off_x - 0.5, ref_y * H.to(tl.float32) + off_y - 0.5,
                                 H, W)
    return x0, y0, lx, ly, a


@triton.jit
def row_softmax_stats(logit_ptr, first_point, row_mask, LP: tl.constexpr):
    """Max and 1/sum(exp) of each row's L*P logits (two passes over LP scalars per row, in registers)."""
    row_max = tl.load(logit_ptr + first_point, mask=row_mask, other=0.0).to(tl.float32)
    for i in tl.static_range(1, LP):
        row_max = tl.maximum(row_max, tl.load(logit_ptr + first_point + i, mask=row_mask, other=0.0).to(tl.float32))
    total = tl.zeros_like(row_max)
    for i in tl.static_range(LP):
        total += tl.exp(tl.load(logit_ptr + first_point + i, mask=row_mask, other=0.0).to(tl.float32) - row_max)
    return row_max, 1.0 / total


@triton.jit
def corners(x0, y0, H, W, start, S, head, M, row_mask):
    """Row offsets (in units of D) of the four corner pixels in value (S, M, D) and whether each is inside.

    Offsets step from the first corner (+M right, +W*M down) instead of being recomputed. A level whose pixels
    do not lie within value's S rows (spatial_shapes inconsistent with value) reads nothing: scalar test per level.
    """
    rows_in = tl.where((start >= 0) & (start + H * W <= S), H, 0)  # 0 rows: the level reads nothing
    r00 = (start + y0 * W + x0) * M + head
    in_x0 = (x0 >= 0) & (x0 < W)
    in_x1 = (x0 >= -1) & (x0 < W - 1)
    in_y0 = row_mask & (y0 >= 0) & (y0 < rows_in)
    in_y1 = row_mask & (y0 >= -1) & (y0 < rows_in - 1)
    down = W * M
    return (r00, r00 + M, r00 + down, r00 + down + M,
            in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1)


@triton.jit
def load_corner(value_ptr, vrow, inside, d, d_mask, D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) tile of value rows, zero outside the image (zero padding). Channels are contiguous."""
    ptrs = value_ptr + vrow[:, None] * D + d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.autotune(
    configs=row_configs(),
    key=["ROWS_BUCKET", "D", "L", "P", "FUSED"],  # the autotuner appends every tensor argument's dtype
    prune_configs_by={"early_config_prune": prune_row_configs},
    cache_results=True,
)
@triton.jit
def msda_fwd_kernel(
    value_ptr,  # (N, S, M, D)
    shapes_ptr,  # (L, 2) int64 (H, W)
    starts_ptr,  # (L,) int64
    loc_ptr,  # (N, Lq, M, L, P, 2) locations in [0, 1]; FUSED: offsets in pixels of each level
    attn_ptr,  # (N, Lq, M, L, P) weights; FUSED: logits, softmax over each row's L*P
    ref_ptr,  # FUSED only: (Lq, 2) reference points in [0, 1]
    out_ptr,  # (N, Lq, M*D) == rows (N, Lq*M) of D
    n_rows,  # Lq * M
    S,
    M,
    ROWS_BUCKET,  # next power of two of n_rows: the autotune key, not used in the body
    D: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FUSED: tl.constexpr,
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
    if FUSED:
        q = rows // M
        ref_x = tl.load(ref_ptr + 2 * q, mask=row_mask, other=0.0).to(tl.float32)
        ref_y = tl.load(ref_ptr + 2 * q + 1, mask=row_mask, other=0.0).to(tl.float32)
        row_max, row_inv = row_softmax_stats(attn_ptr, first_point, row_mask, L * P)

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(L):
        H = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for p in tl.static_range(P):
            point = first_point + level * P + p
            if FUSED:
                x0, y0, lx, ly, a = fused_point(loc_ptr, attn_ptr, point, ref_x, ref_y, row_max, row_inv,
                                                row_mask, H, W)
            else:
                x0, y0, lx, ly, a = bilinear_point(loc_ptr, attn_ptr, point, row_mask, H, W)
            r00, r01, r10, r11, in00, in01, in10, in11 = corners(x0, y0, H, W, start, S, head, M, row_mask)
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


def device_guard(t):
    """Launch on the tensor's own GPU, not the current device (a rank whose current device is another GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 reference_points=None):
    """Launch the forward kernel on contiguous inputs on value's device; the output has value's dtype.

    With reference_points (Lq, 2), sampling_locations are pixel offsets and attention_weights logits (FUSED).
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_empty(N, Lq, M * D)
    if out.numel() == 0 or S == 0 or L * P == 0:  # nothing to sample
        return out.zero_()
    n_rows = Lq * M
    fused = reference_points is not None
    ref = reference_points if fused else sampling_locations  # any tensor: the unfused body never reads it
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), N)
    with device_guard(value):
        msda_fwd_kernel[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ref, out,
            n_rows, S, M, rows_bucket(n_rows), D=D, L=L, P=P, BLOCK_D=triton.next_power_of_2(D), FUSED=fused,
        )
    return out
