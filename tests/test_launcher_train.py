"""End to end through the launcher: real torchrun, 2 ranks, gloo, DeepSpeed ZeRO-3, MLflow on SQLite.

One uninterrupted run and one run stopped after its first step (wall-clock budget -> checkpoint ->
exit 3) then restarted must log the same losses step for step.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.checkpoint import latest_complete
from launcher.dist import free_port

REPO = Path(__file__).resolve().parent.parent
STEPS = 5
pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(SyntheticConfig(out_dir=str(out), num_train=160, num_val=12, samples_per_shard=40))
    return out


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train=[{{name: synthetic, path: {shards}/train}}]",
        f"data.val=[{{name: synthetic_val, path: {shards}/val}}]",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        f"train.output_dir={run_dir}",
        f"train.steps={STEPS}",
        "train.save_every=100",
        f"tracking.tracking_uri=sqlite:///{run_dir.parent}/mlflow.db",
        *extra,
    ]


def _env() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _train_cmd(args: list[str], verb: str = "train") -> list[str]:
    return [sys.executable, "-m", "launcher", verb, "--config", "configs/train/tiny.yaml", *args]


def torchrun(args: list[str], timeout: float = 240, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *_train_cmd(args)[1:]]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_ranks(args: list[str], world_size: int = 2, verb: str = "train") -> list[subprocess.Popen]:
    """One process per rank with RANK/WORLD_SIZE set, as `srun` one-task-per-GPU launches them
    (torchrun would turn a rank's exit code 3 into its own failure code)."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(_train_cmd(args, verb), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 240) -> tuple[list[int], str]:
    outs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, "\n".join(o[-3000:] for o in outs)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    res = torchrun(overrides(shards, run_dir))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_resumed_run_reproduces_uninterrupted_losses(shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "resumed"
    codes, out = wait_ranks(start_ranks(overrides(shards, run_dir, "train.time_budget_s=0.001")))
    assert codes == [3, 3], out  # both ranks stop at the same step with "requeue me"
    assert sorted(losses(run_dir)) == [1]
    assert (run_dir / "checkpoints" / "step_00000001" / "COMPLETE").is_file()

    codes, out = wait_ranks(start_ranks(overrides(shards, run_dir)))
    assert codes == [0, 0], out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # resumed at 2: no step lost or repeated
    got, want = losses(run_dir), losses(uninterrupted)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_checkpoint_excludes_frozen_weights(uninterrupted):
    import torch

    from launcher.config import load_config
    from launcher.fake_model import build_meta

    ckpt = uninterrupted / "checkpoints" / f"step_{STEPS:08d}"
    files = sorted(p.name for p in ckpt.iterdir())
    assert {"COMPLETE", "rng_rank00000.json", "rng_rank00001.json", "trainable"} <= set(files)
    # The run's own model, on the meta device: which parameters are frozen, under which names.
    model = build_meta(load_config(uninterrupted / "config.yaml"))
    frozen = {n: p.numel() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # The frozen parts really are there under these names (else the checks below could not fail):
    # the CLIP tower, SAM's image encoder and the LLM's base weights under LoRA.
    for prefix in ("vision.clip.encoder.", "segmenter.sam.vision_encoder.", "llm.base_model.model.model.layers.0."):
        assert any(n.startswith(prefix) for n in frozen), prefix
    assert sum(frozen.values()) > sum(trainable.values())
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in sorted(ckpt.glob("*model_states.pt"))]
    optim = [torch.load(p, map_location="cpu", weights_only=False) for p in sorted(ckpt.glob("*optim_states.pt"))]
    assert len(states) == len(optim) == 2, files
    # Second names of tied parameters (SAM's shared positional embedding): ZeRO-3 lists those by alias.
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(frozen) - set(trainable)
    for sd in states:
        assert set().union(*sd["param_shapes"]) == set(trainable)
        assert set(trainable) <= set(sd["module"]) and set(sd["module"]) - set(trainable) <= aliases
    # The weights themselves: the ranks' fp32 partitions hold the trainable numbers (ZeRO-3 pads each
    # parameter to a multiple of the 2 ranks), none of the frozen ones.
    saved = sum(t.numel() for o in optim for t in o["optimizer_state_dict"]["fp32_flat_groups"])
    assert sum(trainable.values()) <= saved <= sum(trainable.values()) + len(trainable)


def test_eval_verb_reproduces_the_final_eval_from_the_checkpoint(shards, uninterrupted):
    """Scoring the saved checkpoint in fresh processes gives the metrics the run got at its end."""
    codes, out = wait_ranks(start_ranks(overrides(shards, uninterrupted), verb="eval"))
    assert codes == [0, 0], out
    at_end = json.loads((uninterrupted / f"eval_val_step{STEPS:08d}.json").read_text())
    again = json.loads((uninterrupted / f"eval_eval_step{STEPS:08d}.json").read_text())
    assert {k.split("/", 1)[1]: v for k, v in again.items()} == {k.split("/", 1)[1]: v for k, v in at_end.items()}
    assert at_end["val/all/n_samples"] == 8  # tiny.yaml: eval.max_batches=1, 4 samples on each of 2 ranks


def test_mlflow_run_holds_params_and_metrics_at_steps(uninterrupted):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{uninterrupted.parent}/mlflow.db")
    run_id = (uninterrupted / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS)
    assert run.data.params["model.name"] == "tiny"
    assert run.data.tags["world_size"] == "2"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    want = losses(uninterrupted)
    for m in history:
        assert m.value == pytest.approx(want[m.step], rel=1e-6)
    for key in ("train/ce", "train/bce", "train/dice", "lr", "perf/samples_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)][-1] == STEPS, key
    final = client.get_metric_history(run_id, "val/all/gIoU")
    assert [m.step for m in final] == [STEPS] and 0.0 <= final[0].value <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "eval"} <= artifacts


def test_every_logged_step_records_speed_memory_and_flops(uninterrupted):
    """perf/*: throughput, the step's time split (inside the step's time), peak memory, and TFLOP/s from
    the model's own FLOPs count (CPU ranks: no peak, so no MFU)."""
    from launcher.config import load_config
    from launcher.fake_model import flop_model

    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    flops = flop_model(load_config(uninterrupted / "config.yaml"))
    for r in rows:
        split = r["perf/data_wait_s"] + r["perf/forward_backward_s"] + r["perf/optimizer_step_s"]
        assert 0 < split <= r["perf/step_time_s"] * 1.0001
        assert r["perf/tokens_per_s"] > r["perf/samples_per_s"] > 0 and r["perf/memory_gb"] > 0
        want = (flops.per_sample * r["perf/samples_per_s"] + flops.per_token * r["perf/tokens_per_s"]) / 2 / 1e12
        assert r["perf/tflops_per_gpu"] == pytest.approx(want, rel=1e-6)
        assert "perf/mfu" not in r


def test_sigusr1_to_one_rank_stops_all_with_a_checkpoint(shards, tmp_path):
    """A signal mid-run to one rank: every rank stops at the same step boundary, checkpoint complete."""
    run_dir = tmp_path / "signalled"
    procs = start_ranks(overrides(shards, run_dir, "train.steps=1000"))
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (run_dir / "metrics.jsonl").exists(), "training never logged a step"
        procs[1].send_signal(signal.SIGUSR1)
    finally:
        codes, out = wait_ranks(procs, timeout=180)
    assert codes == [3, 3], out
    stopped_at = max(losses(run_dir))
    assert stopped_at < 1000
    assert latest_complete(run_dir / "checkpoints").name == f"step_{stopped_at:08d}"
