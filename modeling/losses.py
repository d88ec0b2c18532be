"""The training objective: next-token CE + bce * BCE + dice * Dice on the [SEG] masks, as LISA computes
them (BCE: mean over pixels per mask; Dice per mask; both averaged over all masks in the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.config import LossConfig


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
