"""Metric maths on plain arrays, usable without a model: the LISA cIoU/gIoU accumulator, gRefCOCO's
N-acc/T-acc, COCO AP50 (pycocotools), GCG's greedy mIoU and mask recall, caption METEOR/CIDEr
(pycocoevalcap). Each follows shared/EVAL.md; the section is named where a choice was made.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

IGNORE = 255  # a target pixel that counts neither way (ReasonSeg's ignore regions)


def inter_union(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Foreground intersection and union of a binary prediction and a target that may hold IGNORE
    (LISA's intersectionAndUnionGPU, K=2, index 1): ignored pixels count in neither."""
    keep = gt != IGNORE
    p, g = pred.astype(bool) & keep, (gt == 1) & keep
    return float((p & g).sum()), float((p | g).sum())


@dataclass
class IoUAccumulator:
    """LISA's validate (EVAL.md 1.1): cIoU = sum I / (sum U + 1e-10); gIoU = the mean over expressions
    of I / (U + 1e-5), +1 when the union is empty (both empty), averaged as sum / (count + 1e-5)."""

    inter: float = 0.0
    union: float = 0.0
    iou_sum: float = 0.0
    n: int = 0

    def add(self, inter: float, union: float) -> None:
        self.inter += inter
        self.union += union
        self.iou_sum += inter / (union + 1e-5) + (1.0 if union == 0 else 0.0)
        self.n += 1

    @property
    def ciou(self) -> float:
        return self.inter / (self.union + 1e-10)

    @property
    def giou(self) -> float:
        return self.iou_sum / (self.n + 1e-5)


@dataclass
class EmptyTargetCounts:
    """gRefCOCO (EVAL.md 1.2, ReLA's names): 'positive' means no target. A sample is predicted empty
    when no pixel is predicted (our decoders have no separate no-target head)."""

    tp: int = 0  # target empty, prediction empty
    fn: int = 0  # target empty, something predicted
    fp: int = 0  # target present, prediction empty
    tn: int = 0  # target present, something predicted

    def add(self, gt_empty: bool, pred_empty: bool) -> None:
        if gt_empty:
            self.tp += pred_empty
            self.fn += not pred_empty
        else:
            self.fp += pred_empty
            self.tn += not pred_empty

    @property
    def n_acc(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def t_acc(self) -> float | None:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else None


# ---------------------------------------------------------------------------------- COCO AP50
def coco_ap50(images: list[dict], iou_type: str) -> float:
    """Class-agnostic AP at IoU 0.5 (COCOeval stats[1]: area all, 100 detections per image).

    images: [{"size": [h, w], "gt": [RLE or xywh box, ...], "dt": [RLE or xywh box, ...],
    "scores": [...] or None}]; iou_type "segm" (RLEs) or "bbox" (boxes). Equal scores keep the order
    given (COCOeval's stable sort), as GLaMM's GCG AP50 with its constant score 1 (EVAL.md 2)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gts, dts, infos = [], [], []
    for i, im in enumerate(images):
        h, w = im["size"]
        infos.append({"id": i, "height": h, "width": w})
        for g in im["gt"]:
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": 1, "iscrowd": 0, **_region(g, iou_type)})
        scores = im.get("scores") or [1.0] * len(im["dt"])
        for d, s in zip(im["dt"], scores):
            dts.append({"id": len(dts) + 1, "image_id": i, "category_id": 1, "score": float(s), **_region(d, iou_type)})
    if not gts:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": infos, "annotations": gts, "categories": [{"id": 1, "name": "object"}]}
        coco_gt.createIndex()
        if not dts:
            return 0.0
        coco_dt = coco_gt.loadRes(dts)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[1]), 0.0)  # -1: no target at all


def _region(r, iou_type: str) -> dict:
    if iou_type == "segm":
        rle = {"size": r["size"], "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]}
        return {"segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}
    x, y, w, h = (float(v) for v in r)
    return {"bbox": [x, y, w, h], "area": w * h}


# ----------------------------------------------------------------------------------- GCG / MGSC
def iou_matrix(preds: list[np.ndarray], gts: list[np.ndarray]) -> np.ndarray:
    """(len(preds), len(gts)) mask IoU; an empty pair scores 0."""
    out = np.zeros((len(preds), len(gts)))
    for i, p in enumerate(preds):
        for j, g in enumerate(gts):
            inter, union = np.logical_and(p, g).sum(), np.logical_or(p, g).sum()
            out[i, j] = inter / union if union else 0.0
    return out


def greedy_miou(iou: np.ndarray) -> float:
    """GLaMM's GCG mIoU of one image (EVAL.md 2.3): take the largest IoU, drop its row and column,
    repeat while the largest is > 0; the mean of the taken pairs (0 if none). Misses are unpenalised."""
    iou, taken = iou.copy(), []
    while iou.size and iou.max() > 0:
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        taken.append(iou[i, j])
        iou[i, :], iou[:, j] = 0, 0
    return float(np.mean(taken)) if taken else 0.0


def hungarian_miou(iou: np.ndarray) -> float:
    """The one-to-one pairing of largest total IoU (scipy), mean over the pairs (MGLMM's
    matcher.match_masks, which its GCG script never calls: reported beside the greedy figure)."""
    from scipy.optimize import linear_sum_assignment

    if not iou.size:
        return 0.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].mean())


def text_similarity(labels: list[str], phrases: list[str]) -> np.ndarray:
    """(len(labels), len(phrases)) cosine of TF-IDF vectors (word unigrams, fitted on the image's
    labels and phrases): the offline stand-in for GLaMM's bert-base-uncased mean-pooled cosine."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not labels or not phrases:
        return np.zeros((len(labels), len(phrases)))
    vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit(labels + phrases)
    a, b = vec.transform(labels), vec.transform(phrases)
    return (a @ b.T).toarray()  # rows are L2-normalised already


def recall_matches(iou_gt_pred: np.ndarray, sim: np.ndarray | None, iou_thr: float = 0.5, sim_thr: float = 0.5) -> int:
    """GLaMM's mask recall loop (EVAL.md 2.4): take the largest IoU; stop at the first pair below the
    IoU threshold or (sim given) below the text threshold, with no fall-back to the next pair."""
    iou, n = iou_gt_pred.copy(), 0
    while iou.size:
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        if iou[i, j] < iou_thr or (sim is not None and sim[i, j] < sim_thr):
            break
        n += 1
        iou[i, :], iou[:, j] = 0, 0
    return n


# ---------------------------------------------------------------------------------- captions
def caption_scores(refs: dict[str, list[str]], hyps: dict[str, str]) -> dict[str, float]:
    """METEOR 1.5 and CIDEr-D through pycocoevalcap's PTB tokenizer and scorers, called directly:
    COCOEvalCap also builds SPICE, which needs a download and aborts offline (EVAL.md 6)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not hyps:
        return {}
    tok = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in hyps})
        res = tok.tokenize({k: [{"caption": hyps[k]}] for k in hyps})
    # PTB drops an all-punctuation caption to nothing; METEOR wants one string per key
    res = {k: v or [""] for k, v in res.items()}
    m, _ = Meteor().compute_score(gts, res)  # its __del__ ends the Java process
    c, _ = Cider().compute_score(gts, res)
    return {"METEOR": float(m), "CIDEr": float(c)}
