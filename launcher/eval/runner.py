"""Running a model over eval shards: every rank predicts its share (teacher_forced: one forward pass
over the reference conversation, as LISA/GLaMM validate; generate: the model writes its answer), the
predictions are put at the original image size, and rank 0 gathers every (prediction, target) pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from datapipes.config import DataConfig
from launcher import dist
from launcher.eval import masks as M
from launcher.eval.records import Prediction, Target, target_from_sample


@dataclass
class Overlay:
    """What one overlay picture shows (in the SAM frame, where the pixels are)."""

    pixels: torch.Tensor  # (3, S, S) SAM-normalised
    size: tuple[int, int]  # the resized image inside the frame
    gt: torch.Tensor  # (S, S) bool
    pred: torch.Tensor  # (S, S) bool
    key: str
    task: str
    caption: str


@dataclass
class RunSettings:
    mode: str  # teacher_forced | generate
    max_new_tokens: int
    mask_threshold: float  # on logits
    max_batches: int  # per rank; 0: all
    num_overlays: int


def eval_batches(data: DataConfig, tokenizer, *, num_image_tokens: int, clip_size: int, sam_size: int,
                 info: dist.DistInfo, max_batches: int) -> Iterator:
    """The loader's one pass (every sample once; filler samples keep ranks in step), cut at max_batches
    (the same count on every rank, so collective forwards stay matched)."""
    from datapipes.loader import build_eval_loader

    loader = build_eval_loader(data, tokenizer, num_image_tokens=num_image_tokens, clip_size=clip_size,
                               sam_size=sam_size, rank=info.rank, world_size=info.world_size)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            return
        yield batch


def batches_for(max_samples: int, max_batches: int, batch_size: int, world_size: int) -> int:
    """Per-rank batch cap from a global sample cap and a per-rank batch cap (0: no cap)."""
    caps = [c for c in (max_batches, math.ceil(max_samples / (batch_size * world_size)) if max_samples else 0) if c]
    return min(caps) if caps else 0


@torch.no_grad()
def predict_batches(model, batches, settings: RunSettings, info: dist.DistInfo, synced: bool,
                    question=lambda ids: "") -> tuple[list[tuple[Prediction, Target]], list[Overlay]]:
    """This rank's (prediction, target) pairs and, on rank 0, the first overlays."""
    frame = model.mask_size
    pairs, overlays = [], []
    for batch in batches:
        inputs = batch.to(info.device).model_inputs()  # float pixels, wherever the loader left them uint8
        if settings.mode == "teacher_forced":
            out = model(**inputs)
            frame_masks = [m - settings.mask_threshold for m in out.pred_masks]
            answers = [None] * len(batch)
            boxes = _teacher_forced_boxes(out, frame)
        else:
            preds = model.predict(batch.prompt_ids, inputs["clip_pixels"], inputs["sam_pixels"],
                                  max_new_tokens=settings.max_new_tokens, synced_gpus=synced)
            frame_masks = [p.masks for p in preds]
            answers = [p.text for p in preds]
            boxes = [(p.boxes, p.box_scores) if p.boxes is not None else None for p in preds]
        for i, sample in enumerate(batch.samples):
            if batch.is_padding[i] or sample is None:
                continue
            target = target_from_sample(batch.keys[i], sample)
            resized = tuple(int(v) for v in batch.image_sizes[i])
            masks = M.to_original(frame_masks[i].cpu(), resized, target.image_size)
            pred = Prediction(batch.keys[i], answers[i] if answers[i] is not None else target.answer, M.encode(masks))
            if boxes[i] is not None:
                pred.boxes = M.frame_boxes_to_original(boxes[i][0], resized, target.image_size)
                pred.scores = [float(s) for s in boxes[i][1]]
            pairs.append((pred, target))
            if info.is_main and len(overlays) < settings.num_overlays:
                fm = frame_masks[i].cpu()
                union = (fm if fm.dtype == torch.bool else fm > 0).any(0) if len(fm) else torch.zeros(frame, frame, dtype=torch.bool)
                gt = batch.gt_masks[i].cpu().bool().any(0) if len(batch.gt_masks[i]) else torch.zeros_like(union)
                overlays.append(Overlay(inputs["sam_pixels"][i].cpu(), resized, gt, union, batch.keys[i], batch.tasks[i],
                                        f"Q: {question(batch.prompt_ids[i])}\nA: {pred.answer}"))
    return pairs, overlays


def _teacher_forced_boxes(out, frame: int) -> list:
    """The multigranular decoder's box of each fed [SEG] (its best prediction), scored by the
    sample's exists probability; None for the sam decoder (its masks' boxes are used)."""
    from modeling.matcher import cxcywh_to_xyxy

    if out.pred_boxes is None:
        return [None] * len(out.pred_masks)
    exists = out.exists.float().sigmoid().cpu()
    return [(cxcywh_to_xyxy(b.float().cpu()).clamp(0, 1) * frame, exists[i].repeat(len(b))) for i, b in enumerate(out.pred_boxes)]


def gather_pairs(pairs: list, info: dist.DistInfo) -> tuple[list, list[int]]:
    """Every rank's pairs on every rank, in rank order, and how many each rank scored."""
    if not torch.distributed.is_initialized() or info.world_size == 1:
        return pairs, [len(pairs)]
    parts: list = [None] * info.world_size
    torch.distributed.all_gather_object(parts, pairs)
    return [p for part in parts for p in part], [len(part) for part in parts]


def broadcast(obj, info: dist.DistInfo):
    """Rank 0's object on every rank (metrics computed once, reported the same everywhere)."""
    if not torch.distributed.is_initialized() or info.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def with_val(data: DataConfig, name: str, path: str) -> DataConfig:
    from datapipes.config import SourceConfig

    return replace(data, val=[SourceConfig(name=name, path=str(path))])
