"""The eval's one home for mask and box conversions: SAM-frame predictions back to the original image
(SAM's postprocess_masks: crop the resized area, bilinear to H x W, threshold), RLE in and out, and
boxes between the frame and the original image. Mask->box is pycocotools' toBbox on the RLE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from datapipes.schema import decode_mask, encode_mask


def to_original(frame_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> np.ndarray:
    """(k, S, S) mask logits in the padded SAM frame -> (k, H, W) bool at the original image size.
    A boolean prediction (generate mode) is passed as +1/-1 logits: the same 0 threshold then keeps
    exactly the pixels whose bilinear weight is mostly inside the mask."""
    nh, nw = resized_hw
    h, w = original_hw
    if not len(frame_logits):
        return np.zeros((0, h, w), bool)
    x = frame_logits.float()
    if frame_logits.dtype == torch.bool:
        x = x * 2 - 1
    x = x[:, :nh, :nw]
    if (nh, nw) != (h, w):
        x = F.interpolate(x[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return (x > 0).cpu().numpy()


def encode(masks: np.ndarray) -> list[dict]:
    """(k, H, W) binary -> compressed RLEs, counts as str."""
    return [encode_mask(m) for m in masks]


def decode(rles: list[dict], size: tuple[int, int]) -> np.ndarray:
    """RLEs -> (k, H, W) uint8; checks each RLE's size against the image's."""
    for r in rles:
        if list(r["size"]) != list(size):
            raise ValueError(f"RLE of size {list(r['size'])} for an image of size {list(size)}")
    return np.stack([decode_mask(r) for r in rles]) if rles else np.zeros((0, *size), np.uint8)


def union(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return masks.any(0) if len(masks) else np.zeros(size, bool)


def rle_boxes(rles: list[dict]) -> list[list[float]]:
    """Tight xywh boxes (pixel edges) of RLE masks; empty masks give no box."""
    out = []
    for r in rles:
        rle = {"size": r["size"], "counts": r["counts"].encode()}
        if mask_utils.area(rle):
            out.append([float(v) for v in mask_utils.toBbox(rle)])
    return out


def frame_boxes_to_original(xyxy: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> list[list[float]]:
    """(m, 4) xyxy pixels of the SAM frame -> xywh pixels of the original image."""
    sy, sx = original_hw[0] / resized_hw[0], original_hw[1] / resized_hw[1]
    b = xyxy.float().cpu() * torch.tensor([sx, sy, sx, sy])
    return [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in b.tolist()]
