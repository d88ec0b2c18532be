"""`launcher eval --run` on 2 ranks (gloo, ZeRO-3) over small RefCOCO/gRefCOCO/GCG shards: every sample
is scored exactly once although the ranks hold unequal shares (filler padding is not scored), both
ranks end with the same report, and scoring the saved predictions file reproduces the report; the
run's export folder (`launcher eval --model`) scores what its checkpoint scored."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from eval_bench import write_bench

from launcher.__main__ import main
from launcher.dist import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.dist, pytest.mark.slow]
BENCHES = {"refcoco": 7, "grefcoco": 9, "gcg": 5}  # odd counts: one rank gets a filler


def _env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", **extra}
    env.pop("MLFLOW_RUN_ID", None)
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps on synthetic shards (2 ranks: a checkpoint loads at its world size),
    and the benchmark shards."""
    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("evalrun")
    write_synthetic(SyntheticConfig(out_dir=str(root / "syn"), num_train=32, num_val=4, samples_per_shard=16))
    run = root / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "launcher", "train", "--config", "configs/train/tiny.yaml",
           f"data.train=[{{name: synthetic, path: {root}/syn/train}}]", f"data.val=[{{name: v, path: {root}/syn/val}}]",
           "data.batch_size=2", "data.eval_batch_size=2", "eval.max_samples=4", f"train.output_dir={run}", "train.steps=2", "train.save_every=2",
           f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, n in BENCHES.items():
        write_bench(root / "data" / "shards" / f"{name}_val", name, n, seed=n, maxcount=3)
    return root, run


def test_two_rank_eval_scores_every_sample_once_and_equals_scoring_its_saved_predictions(trained):
    root, run = trained
    report, preds = root / "report.json", root / "preds"
    args = ["eval", "--run", str(run), "--bench", ",".join(BENCHES), "--mode", "teacher_forced", "--report", str(report),
            "--save-predictions", str(preds), "data.eval_batch_size=2"]
    port, procs = str(free_port()), []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   SEGCAP_DATA_ROOT=str(root / "data"))
        procs.append(subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    got = json.loads(report.read_text())
    digests = [re.findall(r"report sha1 ([0-9a-f]{40})", o) for o in outs]
    assert digests[0] == digests[1] and len(digests[0]) == 1  # both ranks hold the same report
    assert digests[0][0] == hashlib.sha1(json.dumps(got, sort_keys=True).encode()).hexdigest()
    assert not any("MLflow rejected" in o for o in outs)  # every metric name is one MLflow accepts
    for name, n in BENCHES.items():
        m = got[name]["val"]
        assert sum(m["samples_per_rank"]) == m["expected"] == n and min(m["samples_per_rank"]) > 0
        lines = (preds / f"{name}_val.jsonl").read_text().splitlines()
        keys = [json.loads(line)["key"] for line in lines]
        assert len(keys) == len(set(keys)) == n  # every sample once: no filler, no duplicate
        again = root / f"again_{name}.json"
        assert main(["eval", "--predictions", str(preds / f"{name}_val.jsonl"), "--bench", name, "--mode", "teacher_forced",
                     "--data", str(root / "data" / "shards" / f"{name}_val"), "--report", str(again)]) == 0
        rescored = json.loads(again.read_text())[name]["val"]
        for key, value in rescored.items():
            if key not in ("expected", "mode"):
                assert m[key] == pytest.approx(value), key
    assert "refcoco" in outs[0] and "cIoU" in outs[0]  # the headline table
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    run_id = (run / "mlflow_run_id").read_text().strip()
    tables = {Path(a.path).name for a in client.list_artifacts(run_id, "eval")}
    assert {f"{name}.json" for name in BENCHES} <= tables  # one MLflow table per benchmark
    assert client.get_metric_history(run_id, "bench/refcoco_val/cIoU")[0].value == pytest.approx(got["refcoco"]["val"]["cIoU"])


def test_the_export_folder_scores_what_its_checkpoint_scored(trained):
    root, run = trained
    export = root / "export"
    done = subprocess.run([sys.executable, "-m", "launcher", "export", "--run", str(run), "--out", str(export)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = root / "data" / "shards" / "refcoco_val"
    reports = {}
    for flag, where in (("--model", export), ("--run", run)):
        out = root / f"export_{flag[2:]}.json"
        cmd = ["eval", flag, str(where), "--bench", "refcoco", "--data", str(data), "--report", str(out), "--save-predictions", str(root / flag[2:])]
        if flag == "--model":
            assert main(cmd) == 0
        else:
            done = subprocess.run([sys.executable, "-m", "launcher", *cmd], cwd=REPO, env=_env(), capture_output=True, text=True,
                                  timeout=300, check=False)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        reports[flag] = json.loads(out.read_text())["refcoco"]["val"]
    assert reports["--model"]["n"] == reports["--run"]["n"] == BENCHES["refcoco"]
    assert reports["--model"]["cIoU"] == pytest.approx(reports["--run"]["cIoU"], abs=1e-3)
