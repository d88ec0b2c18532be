"""The CLIP vision tower (frozen; penultimate-layer patch features, CLS dropped, as LLaVA) and the
2-layer GELU MLP projector that maps them into the LLM's embedding space (trained in both stages)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from modeling.config import VisionConfig


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, llm_hidden: int, dtype: torch.dtype):
        super().__init__()
        if cfg.path:
            self.clip = CLIPVisionModel.from_pretrained(cfg.path, dtype=dtype)
        else:
            config = CLIPVisionConfig(
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
            )
            self.clip = CLIPVisionModel._from_config(config, dtype=dtype)
        c = self.clip.config
        self.select_layer = cfg.select_layer
        self.freeze = cfg.freeze
        self.num_image_tokens = (c.image_size // c.patch_size) ** 2
        self.projector = nn.Sequential(
            nn.Linear(c.hidden_size, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        ).to(dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) CLIP-normalised -> (B, num_image_tokens, llm_hidden)."""
        dtype = self.projector[0].weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            out = self.clip(pixel_values=pixels.to(dtype), output_hidden_states=True)
            feats = out.hidden_states[self.select_layer][:, 1:]
        return self.projector(feats)
