"""A 2-rank ZeRO-3 training run (real torchrun, gloo, DeepSpeed) recording into the test's MLflow server on
PostgreSQL: params, metrics at the expected steps, dataset inputs, overlay images, artifacts; then a
resumed run of the same run dir continues the same MLflow run."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from mlflow_stack import REPO

from launcher.dist import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(SyntheticConfig(out_dir=str(out), num_train=80, num_val=8, samples_per_shard=40))
    return out


def train(run_dir, shards, uri, steps):
    args = [f"data.train=[{{name: synthetic, path: {shards}/train}}]",
            f"data.val=[{{name: synthetic_val, path: {shards}/val}}]",
            "data.batch_size=2", "data.eval_batch_size=4", f"train.output_dir={run_dir}", f"train.steps={steps}",
            "train.eval_every=2", "train.save_every=2", "eval.at_start=true", "eval.num_overlays=2",
            f"tracking.tracking_uri={uri}", "tracking.experiment=train-zero3", "tracking.run_name=zero3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "launcher", "train", "--config", "configs/train/tiny.yaml", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_zero3_run_records_everything_and_resume_continues_the_run(mlflow_server, shards, tmp_path):
    from mlflow import MlflowClient

    uri, run_dir = mlflow_server.uri, tmp_path / "run"
    train(run_dir, shards, uri, steps=4)
    c = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text()
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "zero3"

    p = run.data.params
    assert (p["train.steps"], p["train.zero_stage"], p["world_size"]) == ("4", "3", "2")
    assert p["deepspeed.zero_optimization.stage"] == "3" and len(p) > 50
    assert len(p["git.commit"]) == 40 and p["git.dirty"] in ("True", "False")
    assert p["version.torch"].startswith("2.") and p["version.deepspeed"].startswith("0.") and p["version.mlflow"]
    assert p["data.train"].startswith("[{'name': 'synthetic'")

    for key in ("train/loss", "lr", "perf/samples_per_s", "perf/memory_gb", "train/grad_norm", "data/skipped"):
        assert steps_of(c, run_id, key) == [1, 2, 3, 4], key
    assert any(k.startswith("train/") and k not in ("train/loss", "train/grad_norm") for k in run.data.metrics)
    assert steps_of(c, run_id, "val/all/cIoU") == [2, 4] and steps_of(c, run_id, "val_untrained/all/cIoU") == [0]

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    for name, folder, context in (("synthetic", "train", "train"), ("synthetic_val", "val", "eval")):
        raw = (shards / folder / "manifest.json").read_bytes()
        d = inputs[name]
        assert d.dataset.digest == hashlib.sha256(raw).hexdigest()[:16]
        assert json.loads(d.dataset.profile)["num_rows"] == json.loads(raw)["total"]
        assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == context

    images = [a.path for a in c.list_artifacts(run_id, "images")]
    pngs = sorted(path.split("+step+")[1].split("+")[0] for path in images
                  if path.startswith("images/val~00_") and path.endswith(".png"))
    assert pngs == ["0", "2", "4"]  # one val sample's overlay at every eval: the UI's slider
    assert {a.path for a in c.list_artifacts(run_id, "config")} == {"config/config.yaml", "config/deepspeed.json"}
    assert "eval/eval_val_step00000004.json" in {a.path for a in c.list_artifacts(run_id, "eval")}

    # The same run dir again with more steps: the same MLflow run, two attempts, steps 5-6 added.
    train(run_dir, shards, uri, steps=6)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["segcap.attempts"] == "2"
    assert steps_of(c, run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert steps_of(c, run_id, "val/all/cIoU") == [2, 4, 6]
    assert run.data.params["train.steps"] == "4"  # params are the first attempt's
