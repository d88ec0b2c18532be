"""cIoU / gIoU / N-acc on hand-made masks, and which checkpoints count as complete."""

import torch

from launcher.checkpoint import MARKER, _prune, complete_checkpoints, latest_complete
from launcher.evaluate import Tally, score


def box(y0, y1, x0, x1, n=10):
    m = torch.zeros(n, n, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_score_partial_overlap():
    inter, union, iou = score(box(0, 4, 0, 4), box(2, 6, 2, 6))  # 16 and 16 pixels, overlap 4
    assert (inter, union) == (4.0, 28.0) and iou == 4 / 28


def test_empty_target_scores_one_only_when_nothing_predicted():
    empty = torch.zeros(10, 10, dtype=torch.bool)
    assert score(empty, empty)[2] == 1.0
    assert score(box(0, 1, 0, 1), empty)[2] == 0.0


def test_ciou_is_ratio_of_sums_giou_is_mean_of_ratios():
    t = Tally()
    t.add("referring", box(0, 4, 0, 4), box(0, 4, 0, 4))  # IoU 1, I=U=16
    t.add("referring", box(0, 2, 0, 2), box(0, 4, 0, 4))  # IoU 4/16, I=4 U=16
    empty = torch.zeros(10, 10, dtype=torch.bool)
    t.add("empty_referring", empty, empty)  # correct rejection
    t.add("empty_referring", box(0, 1, 0, 2), empty)  # false positive, U=2
    m = t.metrics("val")
    assert m["val/referring/cIoU"] == 20 / 32
    assert m["val/referring/gIoU"] == (1 + 0.25) / 2
    assert m["val/empty_referring/N-acc"] == 0.5
    assert m["val/empty_referring/gIoU"] == 0.5
    assert m["val/all/cIoU"] == 20 / 34 and m["val/all/n"] == 4


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
