"""slurm/stage2.sh running the real trainer (tiny model, synthetic shards, ZeRO-3 on gloo) on the test
cluster: 2 tasks on 1 node, 1 task on each of 2 nodes preempted and requeued, a killed rank.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from slurm_cluster import REPO

from launcher.train import HOLD_ENV

pytestmark = [pytest.mark.slurm, pytest.mark.dist, pytest.mark.slow]  # 2 ranks of the real trainer
STEPS = 5
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0"]
ONE_NODE_TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(SyntheticConfig(out_dir=str(out), num_train=160, num_val=12, samples_per_shard=40))
    return out


def stage2_args(shards: Path, *extra: str) -> list[str]:
    """`sbatch slurm/stage2.sh` arguments: the tiny config on the test shards (run dir left to the script)."""
    return [
        "--config",
        "configs/train/tiny.yaml",
        f"data.train=[{{name: synthetic, path: {shards}/train}}]",
        f"data.val=[{{name: synthetic_val, path: {shards}/val}}]",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        f"train.steps={STEPS}",
        *extra,
    ]


def run_dir_of(output: str) -> Path:
    return Path(output.split("run dir ", 1)[1].split("\n", 1)[0].strip())


def mlflow_runs(run_dir: Path) -> list:
    """The runs in the MLflow store the launcher uses by default (SQLite beside the run dir)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    return [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows}


@pytest.mark.timeout(240)
def test_stage2_trains_with_two_tasks_on_one_node(slurm_1node, shards, tmp_path):
    job = slurm_1node.submit(
        REPO / "slurm/stage2.sh", stage2_args(shards), ONE_NODE_TWO_TASKS, env={"SEGCAP_RUN_ROOT": str(tmp_path)}
    )
    info = slurm_1node.wait(job, "COMPLETED", timeout=200)
    run_dir = run_dir_of(slurm_1node.output(job))
    assert info["ExitCode"] == "0:0" and run_dir.parent == tmp_path
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    [run] = mlflow_runs(run_dir)
    assert run.data.tags["slurm.job_id"] == str(job) and run.data.tags["world_size"] == "2"
    assert run.info.status == "FINISHED"


@pytest.mark.timeout(420)
def test_stage2_on_two_nodes_preempted_and_requeued_reproduces_the_uninterrupted_losses(slurm_2node, shards, tmp_path):
    args = stage2_args(shards, "train.save_every=100")
    ref = slurm_2node.submit(REPO / "slurm/stage2.sh", args, TWO_NODES, env={"SEGCAP_RUN_ROOT": str(tmp_path / "ref")})
    slurm_2node.wait(ref, "COMPLETED", timeout=200)
    want = losses(run_dir_of(slurm_2node.output(ref)))

    # The ranks hold after step 2 until the signal is there (launcher.train.HOLD_ENV): the preemption
    # lands at step 2 however fast or loaded the machine is.
    env = {"SEGCAP_RUN_ROOT": str(tmp_path / "pre"), HOLD_ENV: "2"}
    job = slurm_2node.submit(REPO / "slurm/stage2.sh", args, TWO_NODES, env=env)
    slurm_2node.wait_output(job, r"holding at step 2 until", timeout=200)
    slurm_2node.signal(job, "USR1", target="batch")  # what --signal=B:USR1@600 does before the time limit
    info = slurm_2node.wait(job, "COMPLETED", timeout=200, restarts=1)

    out = slurm_2node.output(job)
    assert "requeueing job" in out and "resumed from" in out and info["ExitCode"] == "0:0"
    assert f"stopping at step 2 (signal {int(signal.SIGUSR1)})" in out
    got = losses(run_dir_of(out))
    assert sorted(got) == list(range(1, STEPS + 1))  # no step lost or repeated
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    # One MLflow run for the job across the requeue: world size 2 (one rank per node), every step once.
    [run] = mlflow_runs(run_dir_of(out))
    assert run.data.tags["slurm.job_id"] == str(job) and run.data.tags["world_size"] == "2"
    assert run.info.status == "FINISHED" and run.data.tags["slurm.nodelist"] != ""


@pytest.mark.timeout(420)
def test_a_killed_rank_fails_the_job_at_once_and_resubmitting_resumes(slurm_2node, shards, tmp_path):
    args = stage2_args(shards, "train.save_every=2", "train.steps=50")
    env = {"SEGCAP_RUN_ROOT": str(tmp_path)}
    job = slurm_2node.submit(REPO / "slurm/stage2.sh", args, TWO_NODES, env=env)
    slurm_2node.wait_output(job, r"step 3/50", timeout=200)
    run_dir = run_dir_of(slurm_2node.output(job))
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    os.kill(slurm_2node.rank_pids(job)[1], signal.SIGKILL)
    # The bound: FAILED within 60 s (--kill-on-bad-exit), not a rank 0 stuck in a collective.
    info = slurm_2node.wait(job, "FAILED", timeout=60)
    assert info["Restarts"] == "0" and "requeueing" not in slurm_2node.output(job)

    # The same run dir (SEGCAP_RUN_DIR), fewer steps: resumes from the last complete checkpoint.
    again = slurm_2node.submit(
        REPO / "slurm/stage2.sh",
        stage2_args(shards, "train.save_every=2", "train.steps=6"),
        TWO_NODES,
        env={"SEGCAP_RUN_DIR": str(run_dir)},
    )
    slurm_2node.wait(again, "COMPLETED", timeout=200)
    resumed = slurm_2node.output(again).split("resumed from ", 1)[1].split(" ", 1)[0]
    assert Path(resumed).parent == run_dir / "checkpoints" and Path(resumed).name >= "step_00000002"
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    # The steps the killed job logged after its last checkpoint were trained again: each is logged once.
    assert sorted(losses(run_dir)) == list(range(1, 7))
