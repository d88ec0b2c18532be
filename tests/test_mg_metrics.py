"""Box AP50 of the evaluator on hand-made detections: greedy matching by score at IoU 0.5, COCO's
101-point interpolated AP, false positives on empty targets, and boxes of mask-only predictions."""

import pytest
import torch

from launcher.evaluate import BoxTally, average_precision, mask_boxes


def test_average_precision_of_a_hand_ranked_list():
    # ranked: TP, FP, TP with 2 targets: precision 1 up to recall 0.5, 2/3 up to recall 1
    ap = average_precision([(0.9, True), (0.8, False), (0.7, True)], n_gt=2)
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert average_precision([(0.5, True)], n_gt=1) == 1.0
    assert average_precision([], n_gt=3) == 0.0


def test_each_target_is_taken_once_best_score_first_and_empty_targets_make_false_positives():
    tally = BoxTally()
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 9.0], [1.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    tally.add("referring", boxes, torch.tensor([0.6, 0.9, 0.8]), gt)  # 0.9 hits; 0.8 misses; 0.6 would hit a taken target
    tally.add("empty_referring", torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.95]), torch.zeros(0, 4))
    ranked = sorted(tally.dets["referring"], reverse=True)
    assert [hit for _, hit in ranked] == [True, False, False]
    assert [s for s, _ in ranked] == pytest.approx([0.9, 0.8, 0.6])
    m = tally.metrics("val")
    assert m["val/referring/box_AP50"] == 1.0
    assert m["val/all/box_AP50"] == pytest.approx(0.5)  # the empty target's box ranks first: precision 1/2
    assert "val/empty_referring/box_AP50" not in m  # no targets, no AP


def test_a_decoder_without_boxes_is_scored_by_its_masks_tight_boxes():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 1:6] = True
    boxes, scores = mask_boxes(masks)
    assert boxes.tolist() == [[1.0, 2.0, 6.0, 4.0]] and scores.tolist() == [1.0]  # the empty mask gives no box
