"""The multi-granularity decoder (mask_decoder.kind multigranular): pixel decoder -> dynamic queries ->
SAM's two-way transformer over the refined SAM-resolution level, upscaled 4x as SAM does while fusing the
finer pyramid level and the pixel decoder's mask features -> heads for mask, box, objectness and exists.

Each decoder item is one LLM query position with tokens [exists, q_1 .. q_num]: the `num` query tokens
give `num` predictions (mask, box, objectness) for sets; the exists token gives "the target is in the
image". Items never attend to each other (each is its own batch entry, like SAM's point batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import (
    SamFeedForward,
    SamLayerNorm,
    SamTwoWayTransformer,
)
from transformers.utils import ModelOutput

from modeling.config import MaskDecoderConfig
from modeling.pixel_decoder import PixelDecoder
from modeling.queries import QueryGenerator, QueryPositions


@dataclass
class DecoderOutput(ModelOutput):
    """A ModelOutput (a dict underneath) so that ZeRO-3's hooks find its tensors."""

    masks: torch.Tensor | None = None  # (Q, num, h, w) mask logits at stride patch/4 (upsample to the S x S frame for losses)
    logits: torch.Tensor | None = None  # (Q, num) objectness logits: the prediction stands for a target instance
    boxes: torch.Tensor | None = None  # (Q, num, 4) normalised (cx, cy, w, h) in the S x S frame
    exists: torch.Tensor | None = None  # (Q,) logit that the item's target exists in the image


class MultiGranularDecoder(nn.Module):
    def __init__(self, dim: int, patch_size: int, llm_width: int, cfg: MaskDecoderConfig):
        super().__init__()
        if dim % 8:
            raise ValueError(f"decoder width (pixel_encoder.output_channels) {dim} must be divisible by 8")
        self.pixel_decoder = PixelDecoder(dim, patch_size, cfg.pixel_decoder)
        self.queries = QueryGenerator(llm_width, dim, cfg.queries)
        self.exists_token = nn.Embedding(1, dim)
        two_way = SamMaskDecoderConfig(
            hidden_size=dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim
        )
        two_way._attn_implementation = "sdpa"  # as SamModel sets for its own decoder
        self.transformer = SamTwoWayTransformer(two_way)
        # SAM's upscaling (two 2x transposed convolutions), with the finer level added after the first.
        self.upscale_conv1 = nn.ConvTranspose2d(dim, dim // 4, 2, stride=2)
        self.upscale_norm = SamLayerNorm(dim // 4, data_format="channels_first")
        finer = self.pixel_decoder.finer_level
        self.fuse_finer = nn.Conv2d(dim, dim // 4, 1) if finer is not None else None
        self.upscale_conv2 = nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2)
        self.mask_head = SamFeedForward(dim, dim, dim // 8, 3)  # hypernetwork, shared by the query tokens
        # Boxes refine a reference taken from the prediction's own mask (its soft extent), as DETR
        # variants refine reference boxes: the query tokens alone carry little position (the image
        # values they attend to have no positional encoding). Zero-init: the first box is the reference.
        self.box_head = SamFeedForward(dim, dim, 4, 3)
        nn.init.zeros_(self.box_head.proj_out.weight)
        nn.init.zeros_(self.box_head.proj_out.bias)
        self.class_head = nn.Linear(dim, 1)
        self.exists_head = nn.Linear(dim, 1)

    def forward(self, hidden: torch.Tensor, pos: QueryPositions, image_embeddings: torch.Tensor) -> DecoderOutput:
        """hidden (B, T, w) last LLM layer; image_embeddings (B, d, H, W) from the SAM encoder."""
        pix = self.pixel_decoder(image_embeddings)
        queries = self.queries(hidden, pos, pix.memory)  # (Q, num, d)
        q, _, d = queries.shape
        exists = self.exists_token(torch.zeros(q, 1, dtype=torch.long, device=queries.device))
        tokens = torch.cat([exists, queries], dim=1)

        main = self.pixel_decoder.main_level
        image = pix.levels[main][pos.b_idx]
        _, _, h, w = image.shape
        out_tokens, keys = self.transformer(
            point_embeddings=tokens.unsqueeze(1),
            image_embeddings=image,
            image_positional_embeddings=pix.pos[main].expand(q, -1, -1, -1),
            attention_similarity=None,
        )
        out_tokens = out_tokens[:, 0]
        x = keys[:, 0].transpose(1, 2).reshape(q, d, h, w)
        x = self.upscale_norm(self.upscale_conv1(x))
        if self.fuse_finer is not None:
            x = x + self.fuse_finer(pix.levels[self.pixel_decoder.finer_level][pos.b_idx])
        x = F.gelu(x)
        x = F.gelu(self.upscale_conv2(x)) + pix.mask_features[pos.b_idx]

        slots = out_tokens[:, 1:]
        masks = torch.einsum("qkc,qchw->qkhw", self.mask_head(slots), x)
        reference = mask_reference_boxes(masks).clamp(1e-3, 1 - 1e-3)
        return DecoderOutput(
            masks=masks,
            logits=self.class_head(slots)[..., 0],
            boxes=(torch.logit(reference) + self.box_head(slots)).sigmoid(),
            exists=self.exists_head(out_tokens[:, 0])[..., 0],
        )


@torch.no_grad()
def mask_reference_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(..., h, w) mask logits -> (..., 4) normalised cxcywh: centre and extent (sqrt(12) x standard
    deviation: exact for a filled rectangle) of the predicted foreground, weighted by its probability;
    the whole soft mask where nothing is above 0. No gradient: box losses train the box head."""
    prob = masks.float().sigmoid()
    fg = prob * (masks > 0)
    weight = torch.where(fg.flatten(-2).sum(-1, keepdim=True).unsqueeze(-1) > 0, fg, prob)
    weight = weight / weight.sum((-2, -1), keepdim=True)
    h, w = masks.shape[-2:]
    ys = (torch.arange(h, device=masks.device, dtype=prob.dtype) + 0.5) / h
    xs = (torch.arange(w, device=masks.device, dtype=prob.dtype) + 0.5) / w
    px, py = weight.sum(-2), weight.sum(-1)  # marginals over x and y
    cx, cy = (px * xs).sum(-1), (py * ys).sum(-1)
    sx = ((px * (xs - cx.unsqueeze(-1)) ** 2).sum(-1)).sqrt()
    sy = ((py * (ys - cy.unsqueeze(-1)) ** 2).sum(-1)).sqrt()
    return torch.stack([cx, cy, 12**0.5 * sx, 12**0.5 * sy], dim=-1).to(masks.dtype)
