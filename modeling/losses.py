"""The training objective: next-token CE + bce * BCE + dice * Dice on the [SEG] masks, as LISA computes
them (BCE: mean over pixels per mask; Dice per mask; both averaged over all masks in the batch); for the
multi-granularity decoder also objectness, box (L1 + GIoU) and exists terms after set matching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modeling.config import LossConfig, MatchCostConfig


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labels != -100. A batch with no labelled token gives 0, not NaN."""
    logits = logits[:, :-1].flatten(0, 1).float()
    labels = labels[:, 1:].flatten()
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, H, W) logits and {0,1} targets -> (N,) sigmoid BCE, mean over pixels."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(1)


def mask_dice(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """(N, H, W) -> (N,) soft Dice loss 1 - (2|P*T| + eps) / (|P| + |T| + eps), P = sigmoid(logits).

    LISA's constants: sums are taken of values / scale so large masks stay in range, and eps makes
    an empty prediction of an empty target a loss of 0.
    """
    p = logits.float().sigmoid().flatten(1) / scale
    t = targets.float().flatten(1)
    numerator = 2 * (p * t).sum(1)
    denominator = p.sum(1) + (t / scale).sum(1)
    return 1 - (numerator + eps) / (denominator + eps)


def segcap_loss(
    ce: torch.Tensor, mask_logits: torch.Tensor, targets: torch.Tensor | None, w: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total and detached terms. `targets` None means the batch has no [SEG]: mask_logits is
    then the dummy decode, kept in the graph with weight 0 so every rank back-propagates through the
    same modules (ZeRO-3), and the total equals ce * w.ce exactly."""
    if targets is None:
        zero = mask_logits.new_zeros(())
        loss = w.ce * ce + 0.0 * mask_logits.sum()
        return loss, {"ce": ce.detach(), "bce": zero.detach(), "dice": zero.detach()}
    bce = mask_bce(mask_logits, targets).mean()
    dice = mask_dice(mask_logits, targets).mean()
    loss = w.ce * ce + w.bce * bce + w.dice * dice
    return loss, {"ce": ce.detach(), "bce": bce.detach(), "dice": dice.detach()}



@dataclass
class InstanceTargets:
    """The target instances of a batch's [SEG] items, flat: instance j belongs to decoder item item[j]."""

    masks: torch.Tensor  # (n, S, S) {0, 1}; zeros where has_mask is False
    boxes: torch.Tensor  # (n, 4) normalised cxcywh in the S x S frame
    has_mask: torch.Tensor  # (n,) bool: False for box-only annotations (no mask loss, no mask cost)
    item: torch.Tensor  # (n,) long: the [SEG] item (row-major over the batch) the instance belongs to


def set_prediction_loss(
    ce: torch.Tensor, dec, num_seg: int, targets: InstanceTargets, has_seg: torch.Tensor, frame: int, w: LossConfig, costs: MatchCostConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The multi-granularity decoder's objective. `dec` (heads.DecoderOutput) holds num_seg [SEG] items,
    then one exists item per sample (has_seg (B,): its target).

    Each [SEG] item's `num` predictions are matched to its instances (matcher.match_cost, scipy's
    linear_sum_assignment). Matched predictions learn objectness 1, their box (L1 + GIoU, averaged over
    instances) and, for instances with a mask, their mask (BCE + Dice as LISA in the S x S frame,
    averaged over masked instances); unmatched ones learn objectness 0 (no-object, weight w.no_object).
    Every output also enters with weight 0, so every head runs in backward on every rank whatever the
    batch holds (ZeRO-3): a batch with no [SEG], or only box-only ones, still trains the exists head.
    """
    from modeling.matcher import cxcywh_to_xyxy, generalized_box_iou, hungarian_match, match_cost

    num = dec.logits.shape[1]
    zero = dec.masks.new_zeros((), dtype=torch.float32)
    cls_target = torch.zeros(num_seg, num, device=dec.logits.device)
    item, slot, inst = [], [], []
    if len(targets.item):
        low = F.interpolate(targets.masks[:, None].float(), size=dec.masks.shape[-2:], mode="area")[:, 0]
        cost = match_cost(
            dec.logits[:num_seg].flatten(), dec.boxes[:num_seg].flatten(0, 1), dec.masks[:num_seg].flatten(0, 1),
            targets.boxes, low, targets.has_mask, costs,
        ).view(num_seg, num, -1).cpu()
        owner = targets.item.cpu()
        for i in range(num_seg):
            mine = (owner == i).nonzero()[:, 0]
            if len(mine):
                rows, cols = hungarian_match(cost[i][:, mine])
                item += [i] * len(rows)
                slot += rows.tolist()
                inst += mine[cols].tolist()
        cls_target[item, slot] = 1.0

    if num_seg:
        weight = torch.where(cls_target > 0, 1.0, w.no_object)
        bce_cls = F.binary_cross_entropy_with_logits(dec.logits[:num_seg].float(), cls_target, reduction="none")
        cls = (bce_cls * weight).sum() / weight.sum()
    else:
        cls = zero
    box_l1 = giou = bce = dice = zero
    if item:
        pred = dec.boxes[item, slot].float()
        gt = targets.boxes[inst].float()
        box_l1 = (pred - gt).abs().sum(-1).mean()
        giou = (1 - generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)).diagonal()).mean()
        masked = targets.has_mask[inst].tolist()
        if any(masked):
            pick = [j for j, m in enumerate(masked) if m]
            low_res = dec.masks[[item[j] for j in pick], [slot[j] for j in pick]]
            logits = F.interpolate(low_res[:, None].float(), size=(frame, frame), mode="bilinear", align_corners=False)[:, 0]
            gt_masks = targets.masks[[inst[j] for j in pick]]
            bce = mask_bce(logits, gt_masks).mean()
            dice = mask_dice(logits, gt_masks).mean()
    exists = F.binary_cross_entropy_with_logits(dec.exists[num_seg:].float(), has_seg.float())
    anchor = dec.masks.sum() + dec.logits.sum() + dec.boxes.sum() + dec.exists.sum()
    loss = (
        w.ce * ce + w.bce * bce + w.dice * dice + w.cls * cls + w.box_l1 * box_l1 + w.giou * giou + w.exists * exists
        + 0.0 * anchor
    )
    terms = {"ce": ce, "bce": bce, "dice": dice, "cls": cls, "box_l1": box_l1, "giou": giou, "exists": exists}
    return loss, {k: v.detach() for k, v in terms.items()}
