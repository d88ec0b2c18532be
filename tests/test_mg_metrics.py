"""Box AP50 of the in-training eval: the multigranular decoder's scored boxes, or each predicted mask's
tight box with score 1; box-only targets count for box AP50 only."""

import numpy as np
import pytest

from datapipes.schema import encode_mask
from launcher.eval.records import Prediction, Target
from launcher.eval.score import score_by_task


def target(key, task, boxes, masks=None):
    masks = masks if masks is not None else [None] * len(boxes)
    return Target(key, task, "synthetic", (40, 40), masks, ["x"] * len(masks), boxes, "[SEG]")


def test_scored_boxes_rank_detections_and_box_only_targets_get_no_mask_score():
    pairs = [
        (Prediction("a", "", [], boxes=[[0, 0, 10, 9], [1, 0, 9, 10], [20, 20, 10, 10]], scores=[0.6, 0.9, 0.8]),
         target("a", "box_referring", [[0, 0, 10, 10]])),  # 0.9 hits, 0.8 misses, 0.6 duplicates
        (Prediction("b", "", [], boxes=[[0, 0, 5, 5]], scores=[0.95]), target("b", "box_referring", [[30, 30, 8, 8]])),
    ]
    m = score_by_task(pairs, "generate", "val")
    # ranked 0.95 (FP), 0.9 (TP), 0.8 (FP), 0.6 (FP) over 2 targets: precision 1/2 up to recall 1/2
    assert m["val/box_referring/box_AP50"] == pytest.approx(51 * 0.5 / 101)
    assert "val/box_referring/cIoU" not in m  # box-only: no mask to score


def test_a_decoder_without_boxes_is_scored_by_its_masks_tight_boxes():
    mask = np.zeros((40, 40), np.uint8)
    mask[2:4, 1:6] = 1
    gt = encode_mask(mask)
    pairs = [(Prediction("a", "[SEG]", [gt]), target("a", "referring", [[1, 2, 5, 2]], [gt]))]
    m = score_by_task(pairs, "generate", "val")
    assert m["val/referring/box_AP50"] == pytest.approx(1.0)
    assert m["val/referring/cIoU"] == pytest.approx(1.0)
