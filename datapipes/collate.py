"""Decoded examples -> one model-ready Batch: CLIP and SAM pixel preprocessing, ground-truth masks in
the padded SAM frame, text right-padded. The Batch layout is the contract in docs/INTERFACES.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from datapipes.text import IGNORE_INDEX, Tokens

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # on 0-1, as openai/clip-vit-large-patch14-336
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)  # on 0-255, as segment-anything
SAM_STD = (58.395, 57.12, 57.375)


@dataclass
class Example:
    """One sample after decode, validation and tokenisation (what the shuffle/skip logic counts)."""

    key: str
    task: str
    image: Image.Image  # RGB
    masks: np.ndarray  # (k, h, w) uint8, k = number of [SEG]
    tokens: Tokens
    extra: dict
    is_padding: bool = False


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100 on user turns, image tokens and padding
    clip_pixels: torch.Tensor  # (B, 3, Hc, Wc) float
    sam_pixels: torch.Tensor  # (B, 3, S, S) float
    gt_masks: list[torch.Tensor]  # B x (k_i, S, S) uint8
    image_sizes: torch.Tensor  # (B, 2) long: (h, w) of the image inside the S x S frame
    tasks: list[str]
    keys: list[str]
    extras: list[dict]
    prompt_ids: list[torch.Tensor]  # B x (P_i,) long
    is_padding: torch.Tensor  # (B,) bool
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples by reason since the worker's last batch

    def model_inputs(self) -> dict:
        """The kwargs of SegCapModel.forward."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "clip_pixels": self.clip_pixels,
            "sam_pixels": self.sam_pixels,
            "gt_masks": self.gt_masks,
        }

    def to(self, device) -> "Batch":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            clip_pixels=self.clip_pixels.to(device),
            sam_pixels=self.sam_pixels.to(device),
            gt_masks=[m.to(device) for m in self.gt_masks],
            prompt_ids=[p.to(device) for p in self.prompt_ids],
        )

    def __len__(self) -> int:
        return len(self.keys)


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to size x size (bicubic), scale to 0-1, CLIP mean/std."""
    arr = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def sam_frame_size(h: int, w: int, size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide: the longest side becomes `size`, rounding half up."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_pixels(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Longest side -> size (bilinear), SAM mean/std on 0-255, zero-pad bottom/right to size x size."""
    nh, nw = sam_frame_size(image.height, image.width, size)
    if (nh, nw) != (image.height, image.width):
        image = image.resize((nw, nh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    out = torch.zeros(3, size, size)
    out[:, :nh, :nw] = x
    return out, (nh, nw)


def sam_masks(masks: np.ndarray, hw: tuple[int, int], size: int) -> torch.Tensor:
    """(k, h, w) masks resized (nearest) like the image and placed in the padded frame."""
    nh, nw = hw
    out = torch.zeros(len(masks), size, size, dtype=torch.uint8)
    for i, m in enumerate(masks):
        if m.shape != (nh, nw):
            m = np.asarray(Image.fromarray(m).resize((nw, nh), Image.NEAREST))
        out[i, :nh, :nw] = torch.tensor(m, dtype=torch.uint8)  # copies: PIL's arrays are read-only
    return out


def collate(examples: list[Example], *, pad_id: int, clip_size: int, sam_size: int, skipped: dict[str, int] | None = None) -> Batch:
    n, t = len(examples), max(len(e.tokens.input_ids) for e in examples)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    clips, sams, gts, sizes = [], [], [], []
    for i, e in enumerate(examples):
        k = len(e.tokens.input_ids)
        input_ids[i, :k] = torch.tensor(e.tokens.input_ids)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(e.tokens.labels)
        clips.append(clip_pixels(e.image, clip_size))
        pix, hw = sam_pixels(e.image, sam_size)
        sams.append(pix)
        gts.append(sam_masks(e.masks, hw, sam_size))
        sizes.append(hw)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        clip_pixels=torch.stack(clips),
        sam_pixels=torch.stack(sams),
        gt_masks=gts,
        image_sizes=torch.tensor(sizes, dtype=torch.long),
        tasks=[e.task for e in examples],
        keys=[e.key for e in examples],
        extras=[e.extra for e in examples],
        prompt_ids=[torch.tensor(e.tokens.prompt_ids, dtype=torch.long) for e in examples],
        is_padding=torch.tensor([e.is_padding for e in examples], dtype=torch.bool),
        skipped=dict(skipped or {}),
    )
