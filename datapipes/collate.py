"""Decoded examples -> one model-ready Batch: CLIP and SAM pixel preprocessing, ground-truth masks in
the padded SAM frame, text right-padded. The Batch layout is the contract in docs/INTERFACES.md.
Images are resized as uint8 (CLIP: Pillow's bicubic, as CLIP's own preprocessing; SAM frame and masks:
OpenCV, ~6x faster than Pillow here and within one level of it); the float normalisation runs here or,
with data.normalize_on_device, in Batch.model_inputs() on the device the batch was moved to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
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
    masks: np.ndarray  # (k, h, w) uint8, k = number of [SEG]; zeros for a box-only [SEG]
    tokens: Tokens
    extra: dict
    is_padding: bool = False
    # Target instances (n >= k): one per [SEG] unless a [SEG] stands for several (MaskAnn.instances).
    boxes: np.ndarray | None = None  # (n, 4) float x, y, w, h in image pixels (used for box-only ones); None: no box-only
    owner: np.ndarray | None = None  # (n,) int: the [SEG] of each instance; None: arange(k)
    has_mask: np.ndarray | None = None  # (n,) bool: False for box-only; None: all True
    instance_masks: np.ndarray | None = None  # (n, h, w) uint8; None: `masks` (one instance per [SEG])
    hw: tuple[int, int] | None = None  # the stored image size (h, w) when `image` was decoded smaller
    sample: object | None = None  # the parsed schema.Sample (eval scores against it at the original size); None: filler

    @property
    def size(self) -> tuple[int, int]:
        return self.hw or (self.image.height, self.image.width)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100 on user turns, image tokens and padding
    clip_pixels: torch.Tensor  # (B, 3, Hc, Wc) float (uint8 0-255 before model_inputs() when normalised on device)
    sam_pixels: torch.Tensor  # (B, 3, S, S) float (uint8 likewise; the padding is 0 in both)
    gt_masks: list[torch.Tensor]  # B x (k_i, S, S) uint8: each [SEG]'s target (union of its instances)
    image_sizes: torch.Tensor  # (B, 2) long: (h, w) of the image inside the S x S frame
    tasks: list[str]
    keys: list[str]
    extras: list[dict]
    prompt_ids: list[torch.Tensor]  # B x (P_i,) long
    is_padding: torch.Tensor  # (B,) bool
    skipped: dict[str, int] = field(default_factory=dict)  # "source/reason" -> bad samples since the worker's last batch
    cut: int = 0  # samples of this batch whose answer was cut to fit max_length
    # Target instances, n_i >= k_i per sample (docs/INTERFACES.md):
    gt_boxes: list[torch.Tensor] = field(default_factory=list)  # B x (n_i, 4) float: normalised cx, cy, w, h in the S x S frame
    gt_owner: list[torch.Tensor] = field(default_factory=list)  # B x (n_i,) long: the [SEG] (0..k_i-1) of each instance
    has_mask: list[torch.Tensor] = field(default_factory=list)  # B x (n_i,) bool: False for box-only instances
    gt_instance_masks: list[torch.Tensor] = field(default_factory=list)  # B x (n_i, S, S) uint8 (gt_masks[i] itself when n_i == k_i)
    samples: list = field(default_factory=list)  # B x schema.Sample (None for fillers): the eval's targets at the original size

    def model_inputs(self) -> dict:
        """The kwargs of SegCapModel.forward. The instance-level targets are added only when a sample has
        box-only or several-instance targets: otherwise the model derives the same from gt_masks."""
        clip, sam = self.clip_pixels, self.sam_pixels
        if clip.dtype == torch.uint8:
            clip, sam = normalize_pixels(clip, sam, self.image_sizes.to(sam.device))
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "clip_pixels": clip,
            "sam_pixels": sam,
            "gt_masks": self.gt_masks,
        }
        if any(not h.all() or len(h) != len(m) for h, m in zip(self.has_mask, self.gt_masks)):
            inputs.update(gt_boxes=self.gt_boxes, gt_owner=self.gt_owner, has_mask=self.has_mask, gt_instance_masks=self.gt_instance_masks)
        return inputs

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
            gt_boxes=[b.to(device) for b in self.gt_boxes],
            gt_owner=[o.to(device) for o in self.gt_owner],
            has_mask=[h.to(device) for h in self.has_mask],
            gt_instance_masks=[m.to(device) for m in self.gt_instance_masks],
        )

    def __len__(self) -> int:
        return len(self.keys)


def clip_frame(image: Image.Image, size: int, pad: bool = False) -> torch.Tensor:
    """(3, size, size) uint8: the image squashed to size x size (bicubic); pad=True pads it to a square
    with the CLIP mean colour first, centred (LLaVA-1.5's image_aspect_ratio "pad"): nothing stretched."""
    if pad and image.width != image.height:
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    return torch.from_numpy(np.array(image.resize((size, size), Image.BICUBIC))).permute(2, 0, 1)


def sam_frame_size(h: int, w: int, size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide: the longest side becomes `size`, rounding half up."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_frame(image: Image.Image, size: int, hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, size, size) uint8: longest side -> size (bilinear), zero-padded bottom/right; and the (h, w)
    inside. `hw` is the stored image size when `image` was decoded smaller (the frame follows it)."""
    nh, nw = sam_frame_size(*(hw or (image.height, image.width)), size)
    pixels = np.asarray(image)
    if (nh, nw) != pixels.shape[:2]:  # bilinear up (SAM's ResizeLongestSide); area averaging down
        pixels = cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_LINEAR if nh > pixels.shape[0] else cv2.INTER_AREA)
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    out[:, :nh, :nw] = torch.as_tensor(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return out, (nh, nw)


_CLIP_MEAN255, _CLIP_STD255 = torch.tensor(CLIP_MEAN) * 255, torch.tensor(CLIP_STD) * 255


def normalize_pixels(clip: torch.Tensor, sam: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, ., .) frames -> float: CLIP mean/std, SAM mean/std with its padding kept at 0.
    Runs where the tensors are (the loader's CPU, or the GPU); in place on one new buffer each, and
    only over the image inside the SAM frame, since temporaries of 1024x1024 frames cost the CPU most."""
    dev = sam.device
    out_clip = clip.float()
    out_clip.sub_(_CLIP_MEAN255.to(dev).view(1, 3, 1, 1)).div_(_CLIP_STD255.to(dev).view(1, 3, 1, 1))
    mean, std = torch.tensor(SAM_MEAN, device=dev).view(3, 1, 1), torch.tensor(SAM_STD, device=dev).view(3, 1, 1)
    out_sam = torch.zeros(sam.shape, dtype=torch.float32, device=dev)
    for i, (h, w) in enumerate(image_sizes.tolist()):
        inside = out_sam[i, :, :h, :w]
        inside.copy_(sam[i, :, :h, :w])
        inside.sub_(mean).div_(std)
    return out_clip, out_sam


def sam_masks(masks: np.ndarray, hw: tuple[int, int], size: int) -> torch.Tensor:
    """(k, h, w) masks resized (nearest) like the image and placed in the padded frame."""
    nh, nw = hw
    out = torch.zeros(len(masks), size, size, dtype=torch.uint8)
    for i, m in enumerate(masks):
        if m.shape != (nh, nw):  # NEAREST_EXACT samples pixel centres: equal to Pillow's NEAREST
            m = cv2.resize(np.ascontiguousarray(m), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
        out[i, :nh, :nw] = torch.as_tensor(np.ascontiguousarray(m, dtype=np.uint8))
    return out


def sam_boxes(boxes: np.ndarray, image_hw: tuple[int, int], hw: tuple[int, int], size: int) -> torch.Tensor:
    """(n, 4) x, y, w, h in image pixels -> normalised cx, cy, w, h of the padded S x S frame."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    sy, sx = hw[0] / image_hw[0], hw[1] / image_hw[1]
    x, y, w, h = b.unbind(1)
    return torch.stack([(x + w / 2) * sx, (y + h / 2) * sy, w * sx, h * sy], dim=1) / size


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(n, S, S) masks in the frame -> their tight boxes (pixel edges) as normalised cx, cy, w, h
    (what the model derives itself when it gets no boxes); an empty mask gives zeros."""
    size = masks.shape[-1]
    out = torch.zeros(len(masks), 4)
    for i, m in enumerate(masks):
        ys, xs = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        if len(ys):
            x0, y0, x1, y1 = float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)
            out[i] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / size
    return out


def collate(examples: list[Example], *, pad_id: int, clip_size: int, sam_size: int, skipped: dict[str, int] | None = None,
            cut: int = 0, normalize: bool = True, clip_pad: bool = False) -> Batch:
    """`normalize=False` leaves the pixels uint8 for Batch.model_inputs() to normalise (on the GPU)."""
    n, t = len(examples), max(len(e.tokens.input_ids) for e in examples)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    clips, sams, gts, sizes = [], [], [], []
    boxes, owners, has_mask, inst_masks = [], [], [], []
    for i, e in enumerate(examples):
        k = len(e.tokens.input_ids)
        input_ids[i, :k] = torch.tensor(e.tokens.input_ids)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(e.tokens.labels)
        clips.append(clip_frame(e.image, clip_size, clip_pad))
        pix, hw = sam_frame(e.image, sam_size, e.hw)
        sams.append(pix)
        gts.append(sam_masks(e.masks, hw, sam_size))
        sizes.append(hw)
        inst_masks.append(gts[-1] if e.instance_masks is None else sam_masks(e.instance_masks, hw, sam_size))
        k = len(inst_masks[-1])
        flags = torch.ones(k, dtype=torch.bool) if e.has_mask is None else torch.as_tensor(e.has_mask, dtype=torch.bool)
        # boxes of instances with a mask: the resized mask's own; box-only ones: the annotation's, scaled
        box = mask_boxes(inst_masks[-1])
        if not flags.all():
            box[~flags] = sam_boxes(e.boxes, e.size, hw, sam_size)[~flags]
        boxes.append(box)
        owners.append(torch.arange(k) if e.owner is None else torch.as_tensor(e.owner, dtype=torch.long))
        has_mask.append(flags)
    clip, sam, image_sizes = torch.stack(clips), torch.stack(sams), torch.tensor(sizes, dtype=torch.long)
    if normalize:
        clip, sam = normalize_pixels(clip, sam, image_sizes)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        clip_pixels=clip,
        sam_pixels=sam,
        gt_masks=gts,
        image_sizes=image_sizes,
        tasks=[e.task for e in examples],
        keys=[e.key for e in examples],
        extras=[e.extra for e in examples],
        prompt_ids=[torch.tensor(e.tokens.prompt_ids, dtype=torch.long) for e in examples],
        is_padding=torch.tensor([e.is_padding for e in examples], dtype=torch.bool),
        skipped=dict(skipped or {}),
        cut=cut,
        gt_boxes=boxes,
        gt_owner=owners,
        has_mask=has_mask,
        gt_instance_masks=inst_masks,
        samples=[e.sample for e in examples],
    )
