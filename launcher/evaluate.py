"""Evaluation on held-out shards: generate, decode masks, score, draw overlays.

Scores follow the referring-segmentation convention of LISA/gRefCOCO (shared/EVAL.md): per sample the
union of predicted masks against the union of ground-truth masks; cIoU = sum(I) / sum(U) over the
set, gIoU = mean per-sample IoU, and a sample with no target scores 1 when nothing is predicted and 0
otherwise (N-acc is the share of those). Every rank scores its shard of the set; sums are reduced.
Box AP50 (class-agnostic, COCO's 101-point interpolation): predicted boxes (the multigranular decoder's,
or the tight box of each predicted mask with score 1) matched greedily by score to each sample's target
instance boxes at IoU >= 0.5. Box-only samples count for box AP only.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from launcher import dist
from launcher.config import RunConfig
from launcher.tracking import Tracker

SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
FIELDS = ("inter", "union", "iou_sum", "n", "empty_n", "empty_correct")


def score(pred: torch.Tensor, gt: torch.Tensor) -> tuple[float, float, float]:
    """(intersection, union, IoU) of two boolean masks; an empty target and empty prediction is IoU 1."""
    inter = float((pred & gt).sum())
    union = float((pred | gt).sum())
    if not gt.any():
        return inter, union, 1.0 if not pred.any() else 0.0
    return inter, union, inter / union


class Tally:
    """Per-task sums from which cIoU, gIoU and N-acc follow."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0))

    def add(self, task: str, pred: torch.Tensor, gt: torch.Tensor) -> None:
        inter, union, iou = score(pred, gt)
        for key in (task, "all"):
            s = self.sums[key]
            s["inter"] += inter
            s["union"] += union
            s["iou_sum"] += iou
            s["n"] += 1
            if not gt.any():
                s["empty_n"] += 1
                s["empty_correct"] += float(not pred.any())

    def reduce(self, tasks: list[str], device: torch.device) -> None:
        """Sum over ranks; `tasks` must be the same list on every rank."""
        if not torch.distributed.is_initialized():
            return
        vec = torch.tensor([self.sums[t][f] for t in tasks for f in FIELDS], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(vec)
        values = vec.cpu().tolist()
        for i, t in enumerate(tasks):
            self.sums[t] = dict(zip(FIELDS, values[i * len(FIELDS) : (i + 1) * len(FIELDS)]))

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {}
        for task, s in sorted(self.sums.items()):
            if s["n"] == 0:
                continue
            out[f"{prefix}/{task}/cIoU"] = s["inter"] / s["union"] if s["union"] else 1.0
            out[f"{prefix}/{task}/gIoU"] = s["iou_sum"] / s["n"]
            out[f"{prefix}/{task}/n"] = s["n"]
            if s["empty_n"]:
                out[f"{prefix}/{task}/N-acc"] = s["empty_correct"] / s["empty_n"]
        return out


class BoxTally:
    """Per-task detections (score, true positive) and target counts from which box AP50 follows."""

    def __init__(self) -> None:
        self.dets: dict[str, list[tuple[float, bool]]] = defaultdict(list)
        self.n_gt: dict[str, int] = defaultdict(int)

    def add(self, task: str, boxes: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor) -> None:
        """boxes (m, 4) and gt (g, 4) xyxy; each target is taken by at most one box, best scores first."""
        from modeling.matcher import pairwise_iou

        iou = pairwise_iou(boxes.float(), gt.float())[0] if len(boxes) and len(gt) else torch.zeros(len(boxes), len(gt))
        free = torch.ones(len(gt), dtype=torch.bool)
        for i in scores.argsort(descending=True, stable=True).tolist():
            cand = torch.where(free, iou[i], -1.0)
            hit = len(gt) > 0 and float(cand.max()) >= 0.5
            if hit:
                free[int(cand.argmax())] = False
            for key in (task, "all"):
                self.dets[key].append((float(scores[i]), hit))
        for key in (task, "all"):
            self.n_gt[key] += len(gt)

    def gather(self) -> None:
        if not torch.distributed.is_initialized():
            return
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (dict(self.dets), dict(self.n_gt)))
        self.dets, self.n_gt = defaultdict(list), defaultdict(int)
        for dets, n_gt in parts:
            for k, v in dets.items():
                self.dets[k] += v
            for k, v in n_gt.items():
                self.n_gt[k] += v

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{task}/box_AP50": average_precision(self.dets[task], n) for task, n in sorted(self.n_gt.items()) if n}


def average_precision(dets: list[tuple[float, bool]], n_gt: int) -> float:
    """COCO's AP: precision made monotone, sampled at recall 0, 0.01, ..., 1 and averaged."""
    tp = np.array([hit for _, hit in sorted(dets, key=lambda d: -d[0])], dtype=np.float64)
    if not n_gt or not len(tp):
        return 0.0
    tps, fps = np.cumsum(tp), np.cumsum(1 - tp)
    recall, precision = tps / n_gt, tps / (tps + fps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder without a box head: the tight box of each non-empty predicted mask, score 1."""
    from modeling.matcher import masks_to_boxes

    boxes = masks_to_boxes(masks)[masks.flatten(1).any(1)]
    return boxes, torch.ones(len(boxes))


def valid_region(mask: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Zero everything outside the resized image (the padding of the SAM frame)."""
    h, w = int(size[0]), int(size[1])
    out = torch.zeros_like(mask)
    out[..., :h, :w] = mask[..., :h, :w]
    return out


def objects_union(extra: dict, size: torch.Tensor, frame: int) -> torch.Tensor:
    """Union of every object in the image (the text-blind baseline), placed in the padded SAM frame
    exactly as the loader places the targets."""
    from datapipes.collate import sam_masks
    from datapipes.schema import decode_mask

    objects = extra.get("objects", [])
    if not objects:
        return torch.zeros(frame, frame, dtype=torch.bool)
    masks = np.stack([decode_mask(obj["rle"]) for obj in objects])
    return sam_masks(masks, (int(size[0]), int(size[1])), frame).bool().any(0)


class Evaluator:
    def __init__(self, cfg: RunConfig, tokenizer, info: dist.DistInfo, run_dir: Path, tracker: Tracker, num_image_tokens: int):
        self.cfg, self.tokenizer, self.info = cfg, tokenizer, info
        self.run_dir, self.tracker = run_dir, tracker
        self.num_image_tokens = num_image_tokens
        self.frame = cfg.model.pixel_encoder.image_size

    def _batches(self):
        from datapipes.loader import build_eval_loader

        loader = build_eval_loader(
            self.cfg.data,
            self.tokenizer,
            num_image_tokens=self.num_image_tokens,
            clip_size=self.cfg.model.vision.image_size,
            sam_size=self.frame,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        for i, batch in enumerate(loader):
            if self.cfg.eval.max_batches and i >= self.cfg.eval.max_batches:
                return
            yield batch

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int, prefix: str = "val") -> dict[str, float]:
        """Generate for every held-out prompt, decode its [SEG] masks, score against the targets."""
        model.eval()
        synced = self.info.world_size > 1 and self.cfg.train.zero_stage == 3

        def predict(batch):
            preds = model.predict(
                batch.prompt_ids,
                batch.clip_pixels.to(self.info.device),
                batch.sam_pixels.to(self.info.device),
                max_new_tokens=self.cfg.eval.max_new_tokens,
                synced_gpus=synced,
            )
            boxes = [(p.boxes, p.box_scores) if p.boxes is not None else mask_boxes(p.masks.cpu()) for p in preds]
            return [p.masks.cpu() for p in preds], [p.text for p in preds], boxes

        metrics = self._score(predict, step, prefix)
        model.train()
        return metrics

    def run_baseline(self, step: int, prefix: str = "val_textblind") -> dict[str, float]:
        """Predict the union of all objects of the image, whatever the question asks."""

        def predict(batch):
            masks = [objects_union(e, s, self.frame)[None] for e, s in zip(batch.extras, batch.image_sizes)]
            return masks, ["(text-blind: union of all objects)"] * len(masks), [mask_boxes(m) for m in masks]

        return self._score(predict, step, prefix)

    def _score(self, predict: Callable, step: int, prefix: str) -> dict[str, float]:
        from modeling.matcher import cxcywh_to_xyxy

        tally, box_tally = Tally(), BoxTally()
        overlays: list[tuple] = []
        for batch in self._batches():
            masks, texts, boxes = predict(batch)
            for i in range(len(masks)):
                if batch.is_padding[i]:
                    continue
                box_tally.add(batch.tasks[i], boxes[i][0], boxes[i][1], cxcywh_to_xyxy(batch.gt_boxes[i].float()) * self.frame)
                if not batch.has_mask[i].all():
                    continue  # box-only targets: no mask to score against
                size = batch.image_sizes[i]
                pred = valid_region(masks[i].bool().any(0) if len(masks[i]) else torch.zeros(self.frame, self.frame, dtype=torch.bool), size)
                gt_i = batch.gt_masks[i]
                gt = valid_region(gt_i.bool().any(0) if len(gt_i) else torch.zeros_like(pred), size)
                tally.add(batch.tasks[i], pred, gt)
                if self.info.is_main and len(overlays) < self.cfg.eval.num_overlays:
                    caption = f"Q: {self._question(batch.prompt_ids[i])}\nA: {texts[i]}"
                    overlays.append((batch.sam_pixels[i], size, gt, pred, batch.keys[i], caption, batch.tasks[i]))
        tasks = sorted(self._all_tasks(tally))
        tally.reduce(tasks, self.info.device)
        box_tally.gather()
        metrics = {**tally.metrics(prefix), **box_tally.metrics(prefix)}
        self.tracker.log_metrics(metrics, step)
        if self.info.is_main:
            out = self.run_dir / f"eval_{prefix}_step{step:08d}.json"
            out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
            self.tracker.log_artifact(out, "eval")
            if self.cfg.tracking.log_overlays and overlays:
                folder = self.run_dir / "overlays" / f"{prefix}_step{step:08d}"
                for j, ov in enumerate(overlays):
                    path = folder / f"{j:02d}_{safe_name(ov[6])}.png"  # the task comes from the shard
                    draw_overlay(*ov[:4], caption=f"{ov[4]} [{ov[6]}]\n{ov[5]}").save(_mkparent(path))
                    self.tracker.log_artifact(path, f"overlays/{prefix}_step{step:08d}")
            summary = " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in metrics.items() if k.endswith(("IoU", "acc", "AP50")))
            print(f"[segcap] eval {prefix} step {step}: {summary}", flush=True)
        return metrics

    def _question(self, prompt_ids: torch.Tensor) -> str:
        """The user's words of a prompt: no system text, no image placeholders, no role tags."""
        image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        text = self.tokenizer.decode([t for t in prompt_ids.tolist() if t != image_id], skip_special_tokens=False)
        text = text.replace(" :", ":")  # word-level tokenizers decode "USER:" as "USER :"
        text = text.rsplit("USER:", 1)[-1]
        return text.split("ASSISTANT:", 1)[0].strip()

    def _all_tasks(self, tally: Tally) -> set[str]:
        """The union of task names seen on any rank (ranks must reduce the same vector)."""
        local = sorted(tally.sums)
        if not torch.distributed.is_initialized():
            return set(local)
        gathered: list = [None] * self.info.world_size
        torch.distributed.all_gather_object(gathered, local)
        return {t for names in gathered for t in names} | {"all"}


def safe_name(text: str, max_len: int = 64) -> str:
    """A file name from data (a shard's task or key): letters, digits, '.', '-', '_' only, never a path
    or a dot file, so nothing read from a shard can write outside the run dir."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:max_len].lstrip(".")
    return name or "_"


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def draw_overlay(sam_pixels: torch.Tensor, size: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, caption: str, scale: int = 4) -> Image.Image:
    """The image with the prediction filled in red and the target outlined in green, plus the text."""
    h, w = int(size[0]), int(size[1])
    img = (sam_pixels.cpu() * SAM_STD + SAM_MEAN).clamp(0, 255)[:, :h, :w].permute(1, 2, 0).numpy().astype(np.float32)
    p = pred[:h, :w].numpy()
    img[p] = 0.45 * img[p] + 0.55 * np.array([255, 0, 0], dtype=np.float32)
    g = gt[:h, :w].numpy()
    edge = g & ~(np.roll(g, 1, 0) & np.roll(g, -1, 0) & np.roll(g, 1, 1) & np.roll(g, -1, 1))
    img[edge] = [0, 255, 0]
    pic = Image.fromarray(img.astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    canvas = Image.new("RGB", (max(w * scale, 320), h * scale + 80), "white")
    canvas.paste(pic, (0, 0))
    ImageDraw.Draw(canvas).text((2, h * scale + 2), _wrap(caption, 60), fill="black")
    return canvas


def _wrap(text: str, width: int, max_lines: int = 6) -> str:
    lines = []
    for para in (text or "").split("\n"):
        lines += [para[i : i + width] for i in range(0, max(len(para), 1), width)]
    return "\n".join(lines[:max_lines])


def evaluate_checkpoint(cfg: RunConfig) -> int:
    """`python -m launcher eval`: score the latest complete checkpoint of train.output_dir on the val
    sources, logged into that run's MLflow run at the checkpoint's step."""
    from launcher import checkpoint
    from launcher.engine import build_run, render_ds_config
    from launcher.tracking import run_tags

    info = dist.identity()
    dist.init(info)
    run_dir = Path(cfg.train.output_dir)
    ckpt = checkpoint.latest_complete(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    tokenizer, model, engine = build_run(cfg, render_ds_config(cfg, info))
    state = checkpoint.load(engine, ckpt, info)
    tracker = Tracker(cfg.tracking, run_dir, active=info.is_main)
    if state.get("mlflow_run_id") and tracker.active:
        tracker.attach(state["mlflow_run_id"])
    else:
        tracker.start(None, {}, {**run_tags(info.world_size), "kind": "eval", "checkpoint": str(ckpt)})
    evaluator = Evaluator(cfg, tokenizer, info, run_dir, tracker, num_image_tokens=model.num_image_tokens)
    evaluator.run(engine.module, step=state["step"], prefix="eval")
    tracker.flush()
    dist.finish()
    return 0
