"""The multigranular decoder end to end through the launcher (2 ranks, gloo, DeepSpeed ZeRO-3, MLflow on
SQLite), on synthetic data that also holds box-only and group targets: a run stopped after its first
step and restarted logs the same losses, every term included, as an uninterrupted run."""

import json

import pytest
from test_launcher_train import (
    STEPS,
    losses,
    overrides,
    start_ranks,
    torchrun,
    wait_ranks,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]
MG = "model.mask_decoder.kind=multigranular"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic_mg")
    mix = {"referring": 0.3, "box_referring": 0.2, "group_referring": 0.2, "empty_referring": 0.1, "multi_referring": 0.1, "panoptic_segcap": 0.1}
    write_synthetic(SyntheticConfig(out_dir=str(out), num_train=160, num_val=12, samples_per_shard=40, task_mix=mix))
    return out


def terms(run_dir) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs_mg") / "full"
    res = torchrun(overrides(shards, run_dir, MG))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_resumed_multigranular_run_reproduces_uninterrupted_losses(shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "resumed"
    codes, out = wait_ranks(start_ranks(overrides(shards, run_dir, MG, "train.time_budget_s=0.001")))
    assert codes == [3, 3], out
    assert sorted(losses(run_dir)) == [1]
    codes, out = wait_ranks(start_ranks(overrides(shards, run_dir, MG)))
    assert codes == [0, 0], out
    got, want = terms(run_dir), terms(uninterrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert set(got[step]) >= {"train/box_l1", "train/giou", "train/cls", "train/exists", "train/bce", "train/dice"}
        for key in want[step]:
            if key != "train/grad_norm":
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_multigranular_run_logs_its_terms_and_box_metrics_to_mlflow(uninterrupted):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{uninterrupted.parent}/mlflow.db")
    run_id = (uninterrupted / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.params["model.mask_decoder.kind"] == "multigranular"
    for key in ("train/box_l1", "train/giou", "train/cls", "train/exists", "val/all/box_AP50", "val/all/cIoU"):
        assert client.get_metric_history(run_id, key), key
    final = json.loads((uninterrupted / f"eval_val_step{STEPS:08d}.json").read_text())
    assert "val/box_referring/box_AP50" in final and "val/box_referring/cIoU" not in final  # box-only: no mask score
