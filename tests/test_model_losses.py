"""The loss terms on hand-made inputs: BCE and Dice per mask, averaging over masks, CE's ignore index,
the weighted total, and the no-[SEG] case whose total is exactly ce * CE."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling.config import LossConfig
from modeling.losses import causal_lm_ce, mask_bce, mask_dice, segcap_loss

BIG = 50.0  # sigmoid(50) == 1 and sigmoid(-50) == 0 in float32


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_is_mean_over_pixels_of_each_mask():
    logits = torch.tensor([[[2.0, -2.0], [2.0, -2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]]], dtype=torch.uint8)
    # pixel loss: softplus(-x) where the target is 1, softplus(x) where it is 0
    first = (softplus(-2) + softplus(-2) + softplus(2) + softplus(-2)) / 4
    assert mask_bce(logits, target).tolist() == pytest.approx([first, math.log(2)], rel=1e-6)


def test_dice_of_perfect_disjoint_half_and_empty_masks():
    target = torch.tensor([[1, 1], [0, 0]], dtype=torch.uint8)
    perfect = torch.tensor([[BIG, BIG], [-BIG, -BIG]])
    disjoint = -perfect
    half = torch.tensor([[BIG, -BIG], [BIG, -BIG]])  # 2 predicted pixels, 1 of them in the target
    empty_pred = torch.full((2, 2), -BIG)
    logits = torch.stack([perfect, disjoint, half, empty_pred])
    targets = torch.stack([target, target, target, torch.zeros_like(target)])
    # 1 - 2|P.T| / (|P| + |T|): 0, 1, 1 - 2/4, and 0 for an empty prediction of an empty target
    assert mask_dice(logits, targets).tolist() == pytest.approx([0.0, 1.0, 0.5, 0.0], abs=1e-3)


def test_mask_terms_are_averaged_over_all_masks_and_weighted():
    logits = torch.tensor([[[BIG, -BIG], [-BIG, -BIG]], [[0.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1, 0], [0, 0]], [[1, 0], [0, 1]]], dtype=torch.uint8)
    w = LossConfig(ce=1.0, bce=2.0, dice=0.5)
    loss, terms = segcap_loss(torch.tensor(1.5), logits, targets, w)
    bce = (0.0 + math.log(2)) / 2
    dice = (0.0 + (1 - 2 * 1.0 / (2.0 + 2))) / 2  # mask 2: P = 0.5 everywhere, |P.T| = 1, |P| = 2, |T| = 2
    assert terms["bce"].item() == pytest.approx(bce, abs=1e-5)
    assert terms["dice"].item() == pytest.approx(dice, abs=1e-3)
    assert loss.item() == pytest.approx(1.5 + 2.0 * bce + 0.5 * dice, abs=1e-3)
    assert not any(t.requires_grad for t in terms.values())


def test_no_seg_total_is_exactly_weighted_ce_and_keeps_the_decoder_in_the_graph():
    dummy = torch.randn(1, 4, 4, requires_grad=True)
    ce = torch.tensor(2.25)
    loss, terms = segcap_loss(ce, dummy, None, LossConfig(ce=0.7))
    assert loss.item() == (0.7 * ce).item()  # bit for bit: the dummy adds an exact 0
    assert terms["bce"].item() == 0.0 and terms["dice"].item() == 0.0
    loss.backward()
    assert dummy.grad is not None and torch.count_nonzero(dummy.grad) == 0


def test_ce_predicts_the_next_token_and_ignores_minus_100():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 10]])
    expected = F.cross_entropy(
        torch.stack([logits[0, 1], logits[0, 2], logits[1, 0], logits[1, 1], logits[1, 2], logits[1, 3]]),
        torch.tensor([3, 4, 7, 8, 9, 10]),
    )
    assert causal_lm_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ce_with_no_labelled_token_is_zero_not_nan():
    assert causal_lm_ce(torch.randn(1, 4, 6), torch.full((1, 4), -100)).item() == 0.0
