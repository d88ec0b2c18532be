"""Triton backward of multi-scale deformable attention: grads of value, sampling_locations, attention_weights.

grad_value is a scatter. Default: fp32 atomics into an fp32 buffer, cast at the end (bits vary run to run).
Deterministic: each corner's weight and target pixel are written out, stably sorted by pixel, then gathered.
"""

import os

import torch
import triton
import triton.language as tl

from .autotune import gather_configs, prune_gather_configs, prune_row_configs, row_configs, rows_bucket
from .triton_fwd import bilinear_point, corners, device_guard, load_corner


@triton.jit
def scatter_corner(grad_value_ptr, keys_ptr, corner_w_ptr, entry, vrow, inside, w, g, d, d_mask, row_mask,
                   key_base, no_key, D: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Send w * grad_out to one corner pixel: an fp32 atomic add, or (deterministic) a record of where and how much."""
    if DETERMINISTIC:
        key = tl.where(inside, key_base + vrow, no_key)
        tl.store(keys_ptr + entry, key.to(keys_ptr.dtype.element_ty), mask=row_mask)
        tl.store(corner_w_ptr + entry, tl.where(inside, w, 0.0), mask=row_mask)
    else:
        ptrs = grad_value_ptr + vrow[:, None] * D + d[None, :]
        # into an fp32 buffer, or (native_atomics) straight into value's fp16/bf16 gradient
        tl.atomic_add(ptrs, (w[:, None] * g).to(grad_value_ptr.dtype.element_ty),
                      mask=inside[:, None] & d_mask[None, :], sem="relaxed")


@triton.autotune(
    configs=row_configs(),
    key=["ROWS_BUCKET", "D", "L", "P", "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": prune_row_configs},  # DETERMINISTIC -> one fixed config
    reset_to_zero=["grad_value_ptr"],  # atomics accumulate: every tuning run must start from zero
    cache_results=True,
)
@triton.jit
def msda_bwd_kernel(
    value_ptr,  # (N, S, M, D)
    shapes_ptr,  # (L, 2) int64 (H, W)
    starts_ptr,  # (L,) int64
    loc_ptr,  # (N, Lq, M, L, P, 2)
    attn_ptr,  # (N, Lq, M, L, P)
    grad_out_ptr,  # (N, Lq, M*D)
    grad_value_ptr,  # (N, S, M, D) fp32, atomics only
    grad_loc_ptr,  # like loc
    grad_attn_ptr,  # like attn
    keys_ptr,  # (N*Lq*M*L*P*4,) int32/int64, deterministic only: value row each corner lands on
    corner_w_ptr,  # (N*Lq*M*L*P*4,) fp32, deterministic only: attention * bilinear weight of each corner
    n_rows,  # Lq * M
    S,
    M,
    n_vrows,  # N * S * M, also the "outside the image" key
    ROWS_BUCKET,  # next power of two of n_rows: the autotune key, not used in the body
    D: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = q * M + head
    row_mask = rows < n_rows
    head = rows % M
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    value_ptr += n * S * M * D
    grad_value_ptr += n * S * M * D
    key_base = n * S * M
    first_point = (n * n_rows + rows) * (L * P)

    g_ptrs = grad_out_ptr + (n * n_rows + rows)[:, None] * D + d[None, :]
    g = tl.load(g_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    for level in tl.static_range(L):
        H = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for p in tl.static_range(P):
            point = first_point + level * P + p
            x0, y0, lx, ly, a = bilinear_point(loc_ptr, attn_ptr, point, row_mask, H, W)
            hx = 1 - lx
            hy = 1 - ly
            r00, r01, r10, r11, in00, in01, in10, in11 = corners(x0, y0, H, W, start, S, head, M, row_mask)
            # <grad_out, value> at each corner: four reductions over D, then everything is per point
            gv00 = tl.sum(g * load_corner(value_ptr, r00, in00, d, d_mask, D), axis=1)
            gv01 = tl.sum(g * load_corner(value_ptr, r01, in01, d, d_mask, D), axis=1)
            gv10 = tl.sum(g * load_corner(value_ptr, r10, in10, d, d_mask, D), axis=1)
            gv11 = tl.sum(g * load_corner(value_ptr, r11, in11, d, d_mask, D), axis=1)

            grad_a = hy * (hx * gv00 + lx * gv01) + ly * (hx * gv10 + lx * gv11)
            # x = loc_x * W - 0.5, so d/d loc_x = W * d/dx of the bilinear interpolant
            grad_x = a * W.to(tl.float32) * (hy * (gv01 - gv00) + ly * (gv11 - gv10))
            grad_y = a * H.to(tl.float32) * (hx * (gv10 - gv00) + lx * (gv11 - gv01))
            tl.store(grad_attn_ptr + point, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=row_mask)
            tl.store(grad_loc_ptr + 2 * point, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)
            tl.store(grad_loc_ptr + 2 * point + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)

            entry = point * 4
            scatter_corner(grad_value_ptr, keys_ptr, corner_w_ptr, entry, r00, in00, a * hy * hx, g, d, d_mask,
                           row_mask, key_base, n_vrows, D, DETERMINISTIC)
            scatter_corner(grad_value_ptr, keys_ptr, corner_w_ptr, entry + 1, r01, in01, a * hy * lx, g, d, d_mask,
                           row_mask, key_base, n_vrows, D, DETERMINISTIC)
            scatter_corner(grad_value_ptr, keys_ptr, corner_w_ptr, entry + 2, r10, in10, a * ly * hx, g, d, d_mask,
                           row_mask, key_base, n_vrows, D, DETERMINISTIC)
            scatter_corner(grad_value_ptr, keys_ptr, corner_w_ptr, entry + 3, r11, in11, a * ly * lx, g, d, d_mask,
                           row_mask, key_base, n_vrows, D, DETERMINISTIC)


@triton.autotune(
    configs=gather_configs(),
    key=["n_vrows", "D"],
    prune_configs_by={"early_config_prune": prune_gather_configs},
)
@triton.jit
def msda_gather_grad_value_kernel(
    grad_out_ptr,  # (N*Lq*M, D) rows
    perm_ptr,  # corner entries sorted (stably) by the value row they land on
    corner_w_ptr,  # weight of each corner entry
    segment_ptr,  # (n_vrows + 1,) value row v owns perm[segment[v]:segment[v+1]]
    grad_value_ptr,  # (N*S*M, D) rows, value's dtype
    n_vrows,
    D: tl.constexpr,
    ENTRIES_PER_ROW: tl.constexpr,  # L * P * 4 corner entries per (query, head) row
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    vrows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = vrows < n_vrows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    begin = tl.load(segment_ptr + vrows, mask=vmask, other=0)
    count = tl.load(segment_ptr + vrows + 1, mask=vmask, other=0) - begin

    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for i in range(tl.max(count, axis=0).to(tl.int32)):  # same order every run: the sort is stable
        live = i < count
        entry = tl.load(perm_ptr + begin + i, mask=live, other=0)
        w = tl.load(corner_w_ptr + entry, mask=live, other=0.0)
        qrow = entry // ENTRIES_PER_ROW
        g_ptrs = grad_out_ptr + qrow[:, None] * D + d[None, :]
        acc += w[:, None] * tl.load(g_ptrs, mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    out_ptrs = grad_value_ptr + vrows.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc.to(grad_value_ptr.dtype.element_ty), mask=vmask[:, None] & d_mask[None, :])


NATIVE_ATOMICS_ENV = "SEGCAP_MSDA_NATIVE_ATOMICS"


def native_atomics_apply(value):
    """SEGCAP_MSDA_NATIVE_ATOMICS=1 and a half-precision value on a GPU with native atomics for it (fp16 from
    sm_70, bf16 from sm_90). Off by default: experimental, for the benchmark to measure against the fp32 buffer."""
    if os.environ.get(NATIVE_ATOMICS_ENV, "") not in ("1", "true") or not value.is_cuda:
        return False
    major = torch.cuda.get_device_capability(value.device)[0]
    return (value.dtype == torch.float16 and major >= 7) or (value.dtype == torch.bfloat16 and major >= 9)


def msda_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  deterministic=False):
    """Gradients (value, sampling_locations, attention_weights), each in its input's dtype. Contiguous inputs."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    n_rows, n_vrows, n_entries = Lq * M, N * S * M, N * Lq * M * L * P * 4
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    if grad_loc.numel() == 0 or value.numel() == 0:  # nothing to launch
        return torch.zeros_like(value), grad_loc.zero_(), grad_attn.zero_()
    unused = value.new_empty(1, dtype=torch.float32)
    if deterministic:
        grad_value_acc = unused
        # int32 keys when they fit: radix sort passes scale with key width
        key_dtype = torch.int32 if n_vrows < 2**31 - 1 else torch.int64
        keys = value.new_empty(n_entries, dtype=key_dtype)
        corner_w = value.new_empty(n_entries, dtype=torch.float32)
    else:
        # fp32 buffer + one cast at the end, or (opt-in) native fp16/bf16 atomics into the gradient itself:
        # half the scatter bytes, no cast pass, but each add rounds to 8 (bf16) or 11 (fp16) mantissa bits
        acc_dtype = value.dtype if native_atomics_apply(value) else torch.float32
        grad_value_acc = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
        keys = corner_w = unused

    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), N)
    with device_guard(value):
        msda_bwd_kernel[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
            grad_value_acc, grad_loc, grad_attn, keys, corner_w,
            n_rows, S, M, n_vrows, rows_bucket(n_rows), D=D, L=L, P=P, BLOCK_D=triton.next_power_of_2(D),
            DETERMINISTIC=deterministic,
        )
    if not deterministic:
        return grad_value_acc.to(value.dtype), grad_loc, grad_attn

    # Group corner entries by value row without atomics: stable sort, then CSR offsets by binary search.
    sorted_keys, perm = torch.sort(keys, stable=True)
    segments = torch.searchsorted(sorted_keys, torch.arange(n_vrows + 1, device=value.device, dtype=keys.dtype))
    grad_value = torch.empty_like(value)
    grid = lambda meta: (triton.cdiv(n_vrows, meta["BLOCK_V"]),)
    with device_guard(value):
        msda_gather_grad_value_kernel[grid](
            grad_output, perm, corner_w, segments, grad_value,
            n_vrows, D=D, ENTRIES_PER_ROW=L * P * 4, BLOCK_D=triton.next_power_of_2(D),
        )
    return grad_value, grad_loc, grad_attn
