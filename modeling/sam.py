"""SAM as the pixel side of the model: the ViT image encoder (frozen, no grad) and the two-way mask
decoder prompted by one query embedding per mask (LISA's embedding-as-mask), from transformers' SamModel.
Low-resolution masks are upsampled bilinearly to the S x S padded frame the targets live in."""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamConfig, SamModel

from modeling.config import MaskDecoderConfig, PixelEncoderConfig


def tiny_sam_config(enc: PixelEncoderConfig, dec: MaskDecoderConfig) -> SamConfig:
    """A random SamConfig from our sizes; the decoder and prompt encoder work at output_channels."""
    width = enc.output_channels
    return SamConfig(
        vision_config=dict(
            image_size=enc.image_size,
            patch_size=enc.patch_size,
            hidden_size=enc.hidden_size,
            num_hidden_layers=enc.num_layers,
            num_attention_heads=enc.num_heads,
            mlp_dim=enc.mlp_dim,
            output_channels=width,
            window_size=enc.window_size,
            global_attn_indexes=list(enc.global_attn_indexes),
            num_pos_feats=width // 2,  # sin+cos of num_pos_feats frequencies = width channels
            # HF's default (1e-10) suits loading weights, not random init: the features would be ~1e-21.
            initializer_range=0.02,
        ),
        prompt_encoder_config=dict(hidden_size=width, image_size=enc.image_size, patch_size=enc.patch_size),
        mask_decoder_config=dict(
            hidden_size=width,
            num_hidden_layers=dec.num_layers,
            num_attention_heads=dec.num_heads,
            mlp_dim=dec.mlp_dim,
            iou_head_hidden_dim=width,
        ),
    )


class SamSegmenter(nn.Module):
    def __init__(self, enc: PixelEncoderConfig, dec: MaskDecoderConfig, dtype: torch.dtype):
        super().__init__()
        if enc.path:
            self.sam = SamModel.from_pretrained(enc.path, dtype=dtype)
        else:
            self.sam = SamModel._from_config(tiny_sam_config(enc, dec), dtype=dtype)
        self.freeze_encoder = enc.freeze
        # SamMaskDecoder.forward reads iou_token.weight / mask_tokens.weight without calling those
        # modules; this tells ZeRO-3 to gather them when the decoder runs (no-op otherwise). A z3 leaf
        # module would do too, but defers its gradient reduction to a full backward hook that fires
        # early when the decoder's inputs are passed as keywords.
        decoder = self.sam.mask_decoder
        for p in (decoder.iou_token.weight, decoder.mask_tokens.weight):
            deepspeed.zero.register_external_parameter(decoder, p)
        self.image_size = self.sam.config.vision_config.image_size
        self.hidden_size = self.sam.config.mask_decoder_config.hidden_size

    @property
    def decoder(self) -> nn.Module:
        return self.sam.mask_decoder

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) SAM-normalised -> image embeddings (B, C, S/p, S/p)."""
        dtype = self.sam.mask_decoder.upscale_conv1.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.sam.vision_encoder(pixels.to(dtype)).last_hidden_state

    def decode(self, image_embeddings: torch.Tensor, queries: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """One mask per query: query n is decoded against image image_index[n].

        queries (N, C), image_index (N,) -> mask logits (N, S, S). Each query is the single sparse
        prompt of its own decoder item (SAM's point_batch of 1), so queries never attend to each other.
        """
        n = queries.shape[0]
        emb = image_embeddings[image_index]
        _, c, h, w = emb.shape
        pe = self._positional_grid(h, w).expand(n, -1, -1, -1)
        # The prompt encoder's "no mask" dense embedding; called as a module so ZeRO-3 gathers it.
        zero = torch.zeros(1, dtype=torch.long, device=emb.device)
        dense = self.sam.prompt_encoder.no_mask_embed(zero).reshape(1, c, 1, 1).expand(n, c, h, w)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=emb,
            image_positional_embeddings=pe,
            sparse_prompt_embeddings=queries.to(emb.dtype)[:, None, None, :],
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks = F.interpolate(low_res[:, 0].float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return masks[:, 0]

    def _positional_grid(self, h: int, w: int) -> torch.Tensor:
        """SamModel.get_image_wide_positional_embeddings, but calling shared_image_embedding as a module
        (reading its parameter directly would see an empty ZeRO-3 partition)."""
        pos = self.sam.shared_image_embedding
        grid = torch.ones((h, w), device=pos.positional_embedding.device)
        y = (grid.cumsum(0) - 0.5) / h
        x = (grid.cumsum(1) - 0.5) / w
        return pos(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)
