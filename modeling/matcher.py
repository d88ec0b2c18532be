"""Set prediction for the multi-granularity decoder: box conversions, generalised IoU, and the bipartite
matching of one query's `num` predictions to its target instances (DETR/Mask2Former: a cost of class,
mask and box terms minimised by scipy's linear_sum_assignment). Box-only instances add no mask cost."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch._subclasses.fake_tensor import is_fake

from modeling.config import MatchCostConfig


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) binary -> (N, 4) tight xyxy boxes in pixels (pixel edges: a lone pixel (y, x) is
    (x, y, x+1, y+1)); an empty mask gives zeros."""
    n = masks.shape[0]
    out = masks.new_zeros((n, 4), dtype=torch.float32)
    rows, cols = masks.bool().any(2), masks.bool().any(1)  # (N, H), (N, W)
    for i in range(n):
        ys, xs = rows[i].nonzero()[:, 0], cols[i].nonzero()[:, 0]
        if len(ys):
            out[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return out


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy (N, 4), (M, 4) -> IoU (N, M) and union (N, M)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-7), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU (N, M) of xyxy boxes: IoU - (enclosing area - union) / enclosing area."""
    iou, union = pairwise_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=1e-7)


def mask_cost(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise BCE (mean over pixels) and Dice costs (N, M) of (N, h, w) logits and (M, h, w) targets in [0, 1]."""
    x, t = logits.flatten(1).float(), targets.flatten(1).float()
    hw = x.shape[1]
    bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / hw
    p = x.sigmoid()
    dice = 1 - (2 * p @ t.T + 1) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1)
    return bce, dice


def match_cost(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_masks: torch.Tensor,
    has_mask: torch.Tensor,
    w: MatchCostConfig,
) -> torch.Tensor:
    """Cost (num, G) of giving prediction i the instance j. logits (num,), boxes (num, 4) and gt_boxes
    (G, 4) normalised cxcywh, masks (num, h, w) logits, gt_masks (G, h, w) at the same size, has_mask (G,)."""
    cost = -w.cls * logits.float().sigmoid()[:, None]
    cost = cost + w.box_l1 * torch.cdist(boxes.float(), gt_boxes.float(), p=1)
    cost = cost - w.giou * generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(gt_boxes.float()))
    if has_mask.any():
        bce, dice = mask_cost(masks, gt_masks)
        cost = cost + (w.bce * bce + w.dice * dice) * has_mask[None, :].to(cost.dtype)
    return cost


@torch.no_grad()
def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (predictions) and columns (instances) of the minimum-cost assignment of a (num, G) cost;
    min(num, G) pairs, returned in column order."""
    if is_fake(cost):  # `launcher plan` runs the model on fake tensors: shapes only, any assignment will do
        k = min(cost.shape)
        return torch.arange(k), torch.arange(k)
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    order = cols.argsort()
    return torch.as_tensor(rows[order], dtype=torch.long), torch.as_tensor(cols[order], dtype=torch.long)
