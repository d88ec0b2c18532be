"""metrics.jsonl after a resume: the steps logged after the checkpoint a run resumes from are dropped
(they are trained and logged again), so every step is there exactly once."""

import json

from launcher.train import _keep_rows_up_to


def test_rows_after_the_resumed_step_are_dropped_and_the_rest_kept_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("".join(r + "\n" for r in rows))
    _keep_rows_up_to(path, 3)
    assert path.read_text() == "".join(r + "\n" for r in rows[:3])
    _keep_rows_up_to(path, 3)  # nothing to drop: untouched
    assert path.read_text() == "".join(r + "\n" for r in rows[:3])
    _keep_rows_up_to(path, 0)  # a fresh start in an old run dir
    assert path.read_text() == ""
    _keep_rows_up_to(tmp_path / "missing.jsonl", 2)  # a first run has no file yet
    assert not (tmp_path / "missing.jsonl").exists()
