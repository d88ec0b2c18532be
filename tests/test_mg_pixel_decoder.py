"""The multi-granularity pixel decoder at tiny scale: pyramid shapes around the SAM embedding, stride
checks, and one deformable encoder layer giving the same output and gradients through the Triton kernel
(interpreter) as through the grid_sample reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is imported (conftest does the same)

import pytest
import torch

from modeling.config import PixelDecoderConfig
from modeling.pixel_decoder import (
    EncoderLayer,
    PixelDecoder,
    level_geometry,
    sine_position,
)


def decoder(patch: int, strides=(4, 8, 16), dim=32) -> PixelDecoder:
    torch.manual_seed(0)
    return PixelDecoder(dim, patch, PixelDecoderConfig(strides=list(strides), msda_backend="reference"))


@pytest.mark.parametrize(
    "patch, grid, sizes, mask_size",
    [
        (8, 8, [16, 8, 4], 32),  # the tiny model: SAM stride 8 -> levels at strides 4/8/16, the finest fused
        (4, 16, [16, 8, 4], 64),  # SAM stride 4: same image strides, the SAM level is the finest
        (16, 4, [8, 4, 2], 16),  # the 1024-px recipe's layout (strides 8/16/32 around SAM's 16), scaled down
    ],
)
def test_pyramid_levels_memory_and_mask_features_have_the_expected_shapes(patch, grid, sizes, mask_size):
    strides = [8, 16, 32] if patch == 16 else [4, 8, 16]
    pd = decoder(patch, strides)
    out = pd(torch.randn(2, 32, grid, grid))
    assert [tuple(l.shape) for l in out.levels] == [(2, 32, s, s) for s in sizes]
    assert [tuple(p.shape) for p in out.pos] == [(1, 32, s, s) for s in sizes]
    assert out.memory.shape == (2, sum(s * s for s in sizes), 32)
    assert out.mask_features.shape == (2, 4, mask_size, mask_size)  # 4x the SAM grid, width d/8
    assert pd.main_level == strides.index(patch)
    assert pd.finer_level == (strides.index(patch // 2) if patch // 2 in strides else None)
    # the memory is the levels, flattened finest first
    assert torch.equal(out.memory[:, : sizes[0] ** 2], out.levels[0].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("strides, match", [([4, 16], "contain the SAM patch size"), ([8, 4, 16], "increasing"), ([1, 8], "at most 4x finer")])
def test_bad_strides_are_rejected_with_the_reason(strides, match):
    with pytest.raises(ValueError, match=match):
        decoder(8, strides)


def test_every_level_token_has_its_pixel_centre_as_reference_point():
    spatial, starts, refs = level_geometry([(2, 4), (1, 2)], "cpu")
    assert spatial.tolist() == [[2, 4], [1, 2]] and starts.tolist() == [0, 8]
    assert refs[:4].tolist() == [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]
    assert refs[8:].tolist() == [[0.25, 0.5], [0.75, 0.5]]


def test_sine_position_differs_per_pixel_and_is_bounded():
    pos = sine_position(4, 5, 16, "cpu", torch.float32)
    flat = pos[0].flatten(1).T  # (20, 16)
    assert pos.shape == (1, 16, 4, 5) and pos.abs().max() <= 1
    assert len({tuple(v.tolist()) for v in flat}) == 20


def test_encoder_layer_matches_between_triton_interpreter_and_reference():
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2)]
    dim, heads, points = 16, 2, 2
    ref = EncoderLayer(dim, heads, len(shapes), points, ffn_dim=32, backend="reference")
    with torch.no_grad():  # non-trivial attention weights and offsets (both start at zero weight)
        for p in ref.self_attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tri = EncoderLayer(dim, heads, len(shapes), points, ffn_dim=32, backend="triton")
    tri.load_state_dict(ref.state_dict())
    spatial, starts, refs = level_geometry(shapes, "cpu")
    src = torch.randn(1, 20, dim)
    pos = torch.randn(1, 20, dim)
    grad = torch.randn(1, 20, dim)
    results = []
    for layer in (ref, tri):
        x = src.clone().requires_grad_()
        out = layer(x, pos, refs, spatial, starts)
        out.backward(grad)
        results.append((out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_r, gx_r, gp_r), (out_t, gx_t, gp_t) = results
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-4, atol=1e-5)
    for name in gp_r:
        torch.testing.assert_close(gp_t[name], gp_r[name], rtol=1e-4, atol=1e-5, msg=name)
    assert gp_r["self_attn.sampling_offsets.weight"].abs().sum() > 0  # the comparison covers the sampling gradients
