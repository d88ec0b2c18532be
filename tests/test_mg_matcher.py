"""Set prediction pieces on hand-made inputs: GIoU and box conversions, the Hungarian matcher against
brute force, box-only instances without mask cost, and the set loss (matching, no-object, box-only)."""

import itertools
import math

import pytest
import torch

from modeling.config import LossConfig, MatchCostConfig
from modeling.heads import DecoderOutput
from modeling.losses import InstanceTargets, set_prediction_loss
from modeling.matcher import (
    cxcywh_to_xyxy,
    generalized_box_iou,
    hungarian_match,
    masks_to_boxes,
    match_cost,
    pairwise_iou,
    xyxy_to_cxcywh,
)


def test_giou_of_hand_computed_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0],  # identical: 1
            [1.0, 1.0, 3.0, 3.0],  # I 1, U 7, enclosing 9: 1/7 - 2/9
            [3.0, 0.0, 4.0, 2.0],  # disjoint: I 0, U 6, enclosing 8: -2/8
            [0.5, 0.5, 1.5, 1.5],  # inside: I 1, U 4, enclosing 4: 1/4
        ]
    )
    assert generalized_box_iou(a, b)[0].tolist() == pytest.approx([1.0, 1 / 7 - 2 / 9, -0.25, 0.25], abs=1e-6)
    assert pairwise_iou(a, b)[0][0].tolist() == pytest.approx([1.0, 1 / 7, 0.0, 0.25], abs=1e-6)


def test_box_formats_round_trip_and_mask_boxes_use_pixel_edges():
    boxes = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    assert cxcywh_to_xyxy(boxes)[0].tolist() == pytest.approx([0.4, 0.2, 0.6, 0.3])
    assert xyxy_to_cxcywh(cxcywh_to_xyxy(boxes))[0].tolist() == pytest.approx(boxes[0].tolist())
    m = torch.zeros(2, 6, 8, dtype=torch.uint8)
    m[0, 1:3, 2:5] = 1
    assert masks_to_boxes(m).tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


def brute_force(cost: torch.Tensor) -> float:
    n, g = cost.shape
    return min(sum(cost[r, c].item() for r, c in zip(rows, range(g))) for rows in itertools.permutations(range(n), g))


@pytest.mark.parametrize("num, g", [(3, 3), (4, 2), (5, 3), (4, 1), (6, 4)])
def test_hungarian_equals_brute_force_on_random_costs(num, g):
    gen = torch.Generator().manual_seed(num * 10 + g)
    for _ in range(20):
        cost = torch.rand(num, g, generator=gen) * 10 - 3
        rows, cols = hungarian_match(cost)
        assert cols.tolist() == list(range(g))  # every instance gets one prediction, in instance order
        assert len(set(rows.tolist())) == g
        assert cost[rows, cols].sum().item() == pytest.approx(brute_force(cost), abs=1e-5)


def test_box_only_instances_add_no_mask_cost():
    gen = torch.Generator().manual_seed(0)
    logits, boxes, masks = torch.randn(4, generator=gen), torch.rand(4, 4, generator=gen) * 0.5 + 0.25, torch.randn(4, 8, 8, generator=gen)
    gt_boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.4]])
    gt_masks = (torch.rand(2, 8, 8, generator=gen) > 0.5).float()
    w = MatchCostConfig()
    has_mask = torch.tensor([True, False])
    cost = match_cost(logits, boxes, masks, gt_boxes, gt_masks, has_mask, w)
    other = match_cost(logits, boxes, masks, gt_boxes, 1 - gt_masks, has_mask, w)
    assert not torch.allclose(cost[:, 0], other[:, 0])  # the masked instance's cost sees the mask
    assert torch.equal(cost[:, 1], other[:, 1])  # the box-only one does not
    no_masks = match_cost(logits, boxes, masks, gt_boxes, gt_masks, torch.tensor([False, False]), w)
    assert torch.equal(cost[:, 1], no_masks[:, 1])


def decoder_output(num_seg: int, batch: int, num: int = 4, hw: int = 8, seed: int = 0) -> DecoderOutput:
    gen = torch.Generator().manual_seed(seed)
    q = num_seg + batch
    return DecoderOutput(
        masks=torch.randn(q, num, hw, hw, generator=gen).requires_grad_(),
        logits=torch.randn(q, num, generator=gen).requires_grad_(),
        boxes=torch.rand(q, num, 4, generator=gen).mul(0.5).add(0.25).requires_grad_(),
        exists=torch.randn(q, generator=gen).requires_grad_(),
    )


def test_set_loss_matches_each_instance_to_one_prediction_and_the_rest_to_no_object():
    """Item 0 stands for three instances, item 1 for one; every matched prediction gets objectness 1."""
    dec = decoder_output(num_seg=2, batch=1)
    gen = torch.Generator().manual_seed(1)
    masks = (torch.rand(4, 16, 16, generator=gen) > 0.5).to(torch.uint8)
    targets = InstanceTargets(masks, torch.rand(4, 4, generator=gen) * 0.5 + 0.25, torch.ones(4, dtype=torch.bool), torch.tensor([0, 0, 0, 1]))
    w = LossConfig(cls=1.0, no_object=0.1)
    loss, terms = set_prediction_loss(torch.tensor(0.0), dec, 2, targets, torch.tensor([1.0]), 16, w, MatchCostConfig())
    # objectness targets, read from the gradient's sign: d BCE / d logit = sigmoid - target
    loss.backward()
    g = dec.logits.grad[:2]
    positives = (g < 0)  # sigmoid - 1 < 0 only where the target is 1
    assert positives.sum(1).tolist() == [3, 1]
    assert all(v.ndim == 0 for v in terms.values()) and set(terms) == {"ce", "bce", "dice", "cls", "box_l1", "giou", "exists"}
    assert terms["bce"] > 0 and terms["dice"] > 0 and terms["box_l1"] > 0
    assert dec.exists.grad[:2].abs().sum() == 0  # [SEG] items' exists outputs have weight 0


def test_box_only_instances_train_the_box_and_objectness_never_a_mask():
    dec = decoder_output(num_seg=1, batch=1)
    targets = InstanceTargets(torch.zeros(1, 16, 16, dtype=torch.uint8), torch.tensor([[0.5, 0.5, 0.2, 0.4]]), torch.tensor([False]), torch.tensor([0]))
    loss, terms = set_prediction_loss(torch.tensor(0.0), dec, 1, targets, torch.tensor([1.0]), 16, LossConfig(), MatchCostConfig())
    loss.backward()
    assert terms["bce"] == 0 and terms["dice"] == 0
    assert terms["box_l1"] > 0 and terms["giou"] > 0 and terms["cls"] > 0
    assert dec.masks.grad is not None and dec.masks.grad.abs().sum() == 0  # in the graph (ZeRO-3), weight 0
    assert dec.boxes.grad[0].abs().sum() > 0


def test_batch_without_seg_learns_only_exists_and_keeps_every_output_in_the_graph():
    dec = decoder_output(num_seg=0, batch=3)
    empty = InstanceTargets(torch.zeros(0, 16, 16), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    ce = torch.tensor(1.5)
    has_seg = torch.tensor([0.0, 0.0, 1.0])
    loss, terms = set_prediction_loss(ce, dec, 0, empty, has_seg, 16, LossConfig(exists=0.5), MatchCostConfig())
    expected = torch.nn.functional.binary_cross_entropy_with_logits(dec.exists.detach(), has_seg)
    assert terms["exists"].item() == pytest.approx(expected.item())
    assert loss.item() == pytest.approx(1.5 + 0.5 * expected.item())
    assert all(terms[k] == 0 for k in ("bce", "dice", "cls", "box_l1", "giou"))
    loss.backward()
    for t in (dec.masks, dec.logits, dec.boxes):
        assert t.grad is not None and t.grad.abs().sum() == 0
    assert dec.exists.grad.abs().sum() > 0
    assert not math.isnan(loss.item())


def test_mask_reference_box_is_the_extent_of_a_filled_rectangle():
    from modeling.heads import mask_reference_boxes

    logits = torch.full((1, 16, 32), -20.0)
    logits[0, 4:12, 8:16] = 20.0  # x 8..16 of 32, y 4..12 of 16
    box = mask_reference_boxes(logits)[0]
    assert box.tolist() == pytest.approx([12 / 32, 8 / 16, 8 / 32, 8 / 16], abs=5e-3)  # discrete: sqrt(n^2 - 1) / N
