"""The in-training eval's per-task scoring on hand-made records, and which checkpoints count as complete."""

import numpy as np
import pytest

from datapipes.schema import encode_mask
from launcher.checkpoint import MARKER, _prune, complete_checkpoints, latest_complete
from launcher.eval.records import Prediction, Target
from launcher.eval.score import score_by_task


def box(y0, y1, x0, x1, n=10):
    m = np.zeros((n, n), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def record(key, task, pred, gt):
    """A prediction and its target; `gt` None: no target (empty_referring)."""
    masks = [] if gt is None else [encode_mask(gt)]
    t = Target(key, task, "synthetic", (10, 10), masks, ["x"] * len(masks), [[0, 0, 1, 1]] * len(masks), "[SEG].")
    return Prediction(key, "[SEG].", [] if pred is None else [encode_mask(pred)]), t


def test_ciou_is_ratio_of_sums_giou_is_mean_of_ratios_n_acc_counts_rejections():
    pairs = [
        record("a", "referring", box(0, 4, 0, 4), box(0, 4, 0, 4)),  # IoU 1, I=U=16
        record("b", "referring", box(0, 2, 0, 2), box(0, 4, 0, 4)),  # IoU 4/16, I=4 U=16
        record("c", "empty_referring", None, None),  # correct rejection
        record("d", "empty_referring", box(0, 1, 0, 2), None),  # false positive, U=2
    ]
    m = score_by_task(pairs, "generate", "val")
    assert m["val/referring/cIoU"] == pytest.approx(20 / 32)
    assert m["val/referring/gIoU"] == pytest.approx((1 + 0.25) / 2, rel=1e-4)
    assert m["val/empty_referring/N-acc"] == 0.5
    assert m["val/empty_referring/gIoU"] == pytest.approx(0.5, rel=1e-4)
    assert m["val/all/cIoU"] == pytest.approx(20 / 34) and m["val/all/n"] == 4
    assert m["val/all/T-acc"] == 1.0


def test_teacher_forced_leaves_empty_targets_out_of_the_mask_scores():
    pairs = [record("a", "referring", box(0, 2, 0, 2), box(0, 4, 0, 4)), record("c", "empty_referring", None, None)]
    m = score_by_task(pairs, "teacher_forced", "val")
    assert m["val/all/n"] == 1 and "val/all/N-acc" not in m and "val/empty_referring/n" not in m


def test_only_marked_checkpoints_count_and_prune_keeps_k(tmp_path):
    for step in (10, 20, 30, 40):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        if step != 40:  # 40 is an interrupted save: no marker
            (d / MARKER).write_text("{}")
    assert latest_complete(tmp_path).name == "step_00000030"
    _prune(tmp_path, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000020", "step_00000030"]
    assert (tmp_path / "step_00000040").exists()  # newer than the newest complete: may be in progress
