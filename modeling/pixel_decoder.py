"""MVP-LM's pixel decoder: a feature pyramid made from the single-scale SAM image embedding (ViTDet's
simple pyramid), refined by multi-scale deformable attention encoder layers (Deformable DETR / Mask2Former,
kernels.msda) into multi-scale memory, plus high-resolution mask features for the mask decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from kernels.msda import ms_deform_attn_fused
from kernels.msda.op import BACKENDS
from modeling.config import PixelDecoderConfig


@dataclass
class PixelDecoderOutput(ModelOutput):
    """A ModelOutput (a dict underneath) so that ZeRO-3's hooks find the tensors in it: with a plain
    dataclass the module's parameters are not gathered again for backward."""

    levels: list[torch.Tensor] | None = None  # per level (B, d, H_l, W_l), finest first: the refined multi-scale memory
    pos: list[torch.Tensor] | None = None  # per level (1, d, H_l, W_l) sine positional encoding (no level embedding)
    memory: torch.Tensor | None = None  # (B, sum H_l W_l, d): the levels flattened and concatenated, finest first
    mask_features: torch.Tensor | None = None  # (B, d // 8, 4 H, 4 W) for the SAM embedding's H x W: the finest level upsampled


def sine_position(h: int, w: int, dim: int, device, dtype, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding: (1, dim, h, w), dim/2 channels for y then dim/2 for x."""
    half = dim // 2
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    freq = temperature ** (2 * (torch.arange(half, device=device) // 2) / half)
    py, px = y[:, None] / freq, x[:, None] / freq  # (h, half), (w, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], dim=2)
    return pos.permute(2, 0, 1).unsqueeze(0).to(dtype)


def level_geometry(shapes: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """spatial_shapes (L, 2) as (H, W), level_start_index (L,), and every token's reference point
    (S, 2) as (x, y) in [0, 1] at its pixel centre (no padding masks: the valid ratio is 1)."""
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    areas = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    refs = []
    for h, w in shapes:
        y, x = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        refs.append(torch.stack([x.flatten(), y.flatten()], dim=1))
    return spatial, starts, torch.cat(refs)


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention module, with the sampling done by kernels.msda."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, backend: str):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pixel decoder width {dim} is not divisible by {heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"pixel_decoder.msda_backend {backend!r}: one of {BACKENDS}")
        self.heads, self.levels, self.points, self.backend = heads, levels, points, backend
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR: offsets start as a ring of points, one direction per head, point i at radius i+1.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index) -> torch.Tensor:
        """query (N, Lq, d), reference_points (Lq, 2) in [0, 1], value (N, S, d) -> (N, Lq, d)."""
        n, lq, dim = query.shape
        m, lv, p = self.heads, self.levels, self.points
        v = self.value_proj(value).view(n, value.shape[1], m, dim // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)  # in pixels of each level
        logits = self.attention_weights(query).view(n, lq, m, lv, p)  # softmax over each head's L*P samples
        # locations and the softmax are computed inside the Triton kernel (kernels.msda.ms_deform_attn_fused);
        # the reference backend computes them in PyTorch first, as Deformable DETR does
        out = ms_deform_attn_fused(v, spatial_shapes, level_start_index, reference_points, offsets, logits,
                                   backend=self.backend)
        return self.output_proj(out)


class EncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the tokens of all levels (Deformable DETR)."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, backend: str):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, levels, points, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index))
        return self.norm2(src + self.ffn(src))


def _resample(channels: int, scale: float) -> nn.Module:
    """ViTDet's simple feature pyramid: 2x steps up by transposed convolution, 2x steps down by max pooling."""
    if scale == 1:
        return nn.Identity()
    if scale > 1:
        layers: list[nn.Module] = []
        for i in range(int(math.log2(scale))):
            layers += [nn.GELU()] if i else []
            layers += [nn.ConvTranspose2d(channels, channels, 2, stride=2)]
        return nn.Sequential(*layers)
    return nn.Sequential(*[nn.MaxPool2d(2) for _ in range(int(math.log2(1 / scale)))])


def pyramid_scales(strides: list[int], patch_size: int) -> list[float]:
    """Each level's resolution relative to the SAM embedding (stride patch_size), after checking that
    the strides are increasing powers of two, contain the patch size and reach no finer than patch/4."""
    if list(strides) != sorted(set(strides)) or any(s < 1 or s & (s - 1) for s in strides):
        raise ValueError(f"pixel_decoder.strides {list(strides)} must be increasing powers of two")
    if patch_size not in strides:
        raise ValueError(f"pixel_decoder.strides {list(strides)} must contain the SAM patch size {patch_size}")
    if strides[0] * 4 < patch_size:
        raise ValueError(f"pixel_decoder.strides {list(strides)}: the finest may be at most 4x finer than the patch size {patch_size}")
    return [patch_size / s for s in strides]


def _upsample(channels: int, out_channels: int, factor: int) -> nn.Module:
    """1x1 convolution (factor 1) or 2x transposed convolutions to `factor` times the resolution."""
    if factor == 1:
        return nn.Conv2d(channels, out_channels, 1)
    steps = int(math.log2(factor))
    layers: list[nn.Module] = []
    for i in range(steps):
        last = i == steps - 1
        layers += [nn.ConvTranspose2d(channels if i == 0 else channels // 4, out_channels if last else channels // 4, 2, stride=2)]
        layers += [] if last else [nn.GELU()]
    return nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    def __init__(self, dim: int, patch_size: int, cfg: PixelDecoderConfig):
        super().__init__()
        strides = list(cfg.strides)
        scales = pyramid_scales(strides, patch_size)
        self.main_level = strides.index(patch_size)  # the level at the SAM embedding's resolution
        # the level the mask decoder adds after its first 2x upscaling, when the pyramid has one
        self.finer_level = strides.index(patch_size // 2) if patch_size // 2 in strides else None
        self.pyramid = nn.ModuleList(_resample(dim, s) for s in scales)
        # Mask2Former's input projection: 1x1 conv + GroupNorm per level.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GroupNorm(min(32, dim), dim)) for _ in scales
        )
        self.level_embed = nn.Embedding(len(scales), dim)  # called as a module: ZeRO-3 gathers it
        nn.init.normal_(self.level_embed.weight, std=0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, cfg.num_heads, len(scales), cfg.num_points, cfg.ffn_dim, cfg.msda_backend)
            for _ in range(cfg.num_layers)
        )
        # at the mask decoder's output resolution (4x the SAM embedding's, as SAM's upscaling)
        self.mask_features = _upsample(dim, dim // 8, int(strides[0] * 4 // patch_size))

    def forward(self, image_embeddings: torch.Tensor) -> PixelDecoderOutput:
        """(B, d, H, W) SAM embedding -> refined levels, their positional encodings, flat memory, mask features."""
        feats = [proj(up(image_embeddings)) for up, proj in zip(self.pyramid, self.input_proj)]
        b, d = feats[0].shape[:2]
        shapes = [tuple(f.shape[-2:]) for f in feats]
        spatial, starts, refs = level_geometry(shapes, feats[0].device)
        pos = [sine_position(h, w, d, f.device, f.dtype) for f, (h, w) in zip(feats, shapes)]
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)  # (B, S, d)
        level_embed = self.level_embed(torch.arange(len(feats), device=src.device))
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[i] for i, p in enumerate(pos)], dim=1)
        for layer in self.layers:
            src = layer(src, pos_flat, refs.to(src.dtype), spatial, starts)
        offsets = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
        levels = [src[:, s : s + h * w].transpose(1, 2).reshape(b, d, h, w) for (h, w), s in zip(shapes, offsets)]
        return PixelDecoderOutput(levels=levels, pos=pos, memory=src, mask_features=self.mask_features(levels[0]))
