"""Scoring (prediction, target) pairs the way each benchmark family is scored (shared/EVAL.md), the
same code for a model's run and for a predictions file. Masks are compared at the original image size.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from launcher.eval import masks as M
from launcher.eval.metrics import (
    IGNORE,
    EmptyTargetCounts,
    IoUAccumulator,
    caption_scores,
    coco_ap50,
    greedy_miou,
    hungarian_miou,
    inter_union,
    iou_matrix,
    recall_matches,
    text_similarity,
)
from launcher.eval.records import Prediction, Target, phrases_of, plain_caption

Pairs = list[tuple[Prediction, Target]]
MODES = ("teacher_forced", "generate")


def pair(preds: list[Prediction], targets: dict[str, Target]) -> Pairs:
    """Each prediction with its target by key; a key with no target is an error naming it."""
    missing = [p.key for p in preds if p.key not in targets]
    if missing:
        raise KeyError(f"{len(missing)} prediction key(s) not in the benchmark, e.g. {missing[:3]}")
    return [(p, targets[p.key]) for p in preds]


def _gt_masks(t: Target) -> np.ndarray:
    """(k, H, W) uint8 with ReasonSeg's ignore region (extra["ignore"], an RLE) set to IGNORE."""
    gt = M.decode([m for m in t.masks if m is not None], t.image_size)
    if t.extra.get("ignore") is not None:
        gt[:, M.decode([t.extra["ignore"]], t.image_size)[0].astype(bool)] = IGNORE
    return gt


def _pred_masks(p: Prediction, t: Target) -> np.ndarray:
    return M.decode(p.masks, t.image_size).astype(bool)


def _merged(p: Prediction, t: Target) -> tuple[np.ndarray, np.ndarray]:
    gt = _gt_masks(t)
    merged = np.zeros(t.image_size, np.uint8)
    if len(gt):
        merged[(gt == 1).any(0)] = 1
        merged[(gt == IGNORE).any(0) & (merged == 0)] = IGNORE
    return M.union(_pred_masks(p, t), t.image_size), merged


# ------------------------------------------------------------------------------- referring
def score_referring(pairs: Pairs) -> dict[str, float]:
    """LISA's protocol (EVAL.md 1.1): every expression ([SEG]) is scored, the i-th predicted mask
    against the i-th target (a missing prediction is an empty mask). ReasonSeg: also split by the
    query's kind (source["is_sentence"]: long sentence vs short phrase)."""
    accs: dict[str, IoUAccumulator] = defaultdict(IoUAccumulator)
    for p, t in pairs:
        gt, pred = _gt_masks(t), _pred_masks(p, t)
        sentence = t.source.get("is_sentence", t.extra.get("is_sentence"))
        groups = ["overall"] + ([] if sentence is None else ["long" if sentence else "short"])
        for i in range(len(gt)):
            inter, union = inter_union(pred[i] if i < len(pred) else np.zeros(t.image_size, bool), gt[i])
            for g in groups:
                accs[g].add(inter, union)
    out = {}
    for g, a in sorted(accs.items()):
        prefix = "" if g == "overall" else f"{g}/"
        out.update({f"{prefix}cIoU": a.ciou, f"{prefix}gIoU": a.giou, f"{prefix}n": a.n})
    return out


def score_generalized(pairs: Pairs) -> dict[str, float]:
    """gRefCOCO as MGLMM (EVAL.md 1.2): all predicted masks OR-merged against all targets OR-merged,
    the LISA accumulator; plus ReLA's N-acc = TP/(TP+FN) and T-acc = TN/(TN+FP), 'predicted empty'
    meaning no predicted pixel."""
    acc, counts = IoUAccumulator(), EmptyTargetCounts()
    for p, t in pairs:
        pred, gt = _merged(p, t)
        acc.add(*inter_union(pred, gt))
        counts.add(gt_empty=not (gt == 1).any(), pred_empty=not pred.any())
    out = {"cIoU": acc.ciou, "gIoU": acc.giou, "n": acc.n}
    if counts.n_acc is not None:
        out["N-acc"] = counts.n_acc
    if counts.t_acc is not None:
        out["T-acc"] = counts.t_acc
    return out


# --------------------------------------------------------------------------- GCG / MGSC / captions
def score_grounded_captions(pairs: Pairs, mode: str) -> dict[str, float]:
    """GLaMM's GCG evaluate.py (EVAL.md 2): AP50 (COCOeval segm, score 1, masks in emitted order),
    greedy mIoU (and the Hungarian figure beside it), mask recall with a TF-IDF text similarity in
    place of BERT (not comparable to published MR; the IoU-only recall is its upper bound), and METEOR/
    CIDEr of the caption (generate mode only: a fed reference would score itself)."""
    images, greedy, hungarian = [], [], []
    matched = matched_iou_only = n_labels = 0
    for p, t in pairs:
        gt, pred = _gt_masks(t).astype(bool), _pred_masks(p, t)
        images.append({"size": list(t.image_size), "gt": [m for m in t.masks if m is not None], "dt": p.masks})
        iou = iou_matrix(list(pred), list(gt))
        greedy.append(greedy_miou(iou))
        hungarian.append(hungarian_miou(iou))
        phrases = phrases_of(p.answer)[: len(pred)]  # paired with masks by index, as GLaMM
        n_labels += len(gt)
        matched_iou_only += recall_matches(iou.T, None)
        sim = np.zeros((len(gt), len(pred)))
        sim[:, : len(phrases)] = text_similarity(t.phrases[: len(gt)], phrases)
        matched += recall_matches(iou.T, sim)
    out = {
        "AP50": coco_ap50(images, "segm"),
        "mIoU": float(np.mean(greedy)) if greedy else 0.0,
        "mIoU_hungarian": float(np.mean(hungarian)) if hungarian else 0.0,
        "MR text-sim:tfidf": matched / n_labels if n_labels else 0.0,
        "recall_iou_only": matched_iou_only / n_labels if n_labels else 0.0,
        "n": len(pairs),
    }
    if mode == "generate":
        out.update(score_captions(pairs))
    return out


def score_captions(pairs: Pairs) -> dict[str, float]:
    """METEOR and CIDEr of the answer (tags and [SEG] removed) against the reference caption(s)."""
    hyps = {p.key: plain_caption(p.answer) for p, _ in pairs}
    refs = {t.key: t.captions for _, t in pairs}
    return caption_scores(refs, hyps)


# ---------------------------------------------------------------------------- in-training (by task)
def score_by_task(pairs: Pairs, mode: str, prefix: str) -> dict[str, float]:
    """The held-out mixture of a training run, per task and `all`: each sample's merged prediction
    against its merged targets (LISA accumulator), N-acc/T-acc where targets are empty, and box AP50
    (the decoder's scored boxes, else each predicted mask's tight box with score 1). Box-only
    targets count for box AP50 only. Teacher-forced: an empty target has no [SEG] to feed, so it
    shows nothing about rejection and is left out of the mask scores."""
    by_task: dict[str, Pairs] = defaultdict(list)
    for p, t in pairs:
        for key in (t.task, "all"):
            by_task[key].append((p, t))
    out = {}
    for task, group in sorted(by_task.items()):
        out[f"{prefix}/{task}/n_samples"] = len(group)  # predicted; `n` counts those with a mask score
        masked = [(p, t) for p, t in group if all(m is not None for m in t.masks)]
        if mode == "teacher_forced":
            masked = [(p, t) for p, t in masked if t.masks]
        if masked:
            for name, v in score_generalized(masked).items():
                out[f"{prefix}/{task}/{name}"] = v
        boxes = [_box_image(p, t) for p, t in group]
        if any(im["gt"] for im in boxes):
            out[f"{prefix}/{task}/box_AP50"] = coco_ap50(boxes, "bbox")
    return out


def _box_image(p: Prediction, t: Target) -> dict:
    if p.boxes is not None:
        return {"size": list(t.image_size), "gt": t.boxes, "dt": p.boxes, "scores": p.scores}
    boxes = M.rle_boxes(p.masks)
    return {"size": list(t.image_size), "gt": t.boxes, "dt": boxes, "scores": [1.0] * len(boxes)}


def score_boxes(pairs: Pairs) -> dict[str, float]:
    """Box AP50 of a benchmark (the multigranular decoder's boxes, else the masks' tight boxes)."""
    return {"box_AP50": coco_ap50([_box_image(p, t) for p, t in pairs], "bbox")}
