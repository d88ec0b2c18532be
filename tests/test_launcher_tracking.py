"""The Tracker against a real MLflow server on PostgreSQL (tests/mlflow_stack.py): what a run records,
attempts and their status, a store that is down or hangs, `runs sync` and `runs compare`."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow_stack import REPO, free_port
from PIL import Image

from launcher.__main__ import main
from launcher.config import TrackingConfig
from launcher.tracking import Tracker

pytestmark = pytest.mark.slow


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(uri, run_id, key):
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def test_tracker_records_a_run_and_resumes_the_same_run(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    cfg = TrackingConfig(tracking_uri=uri, experiment="records", run_name="t")
    tracker = Tracker(cfg, tmp_path / "run", active=True)
    tracker.start(None, {"train.steps": 3, "model.name": "tiny"}, {"slurm.job_id": "42"})
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt", "config")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "o.png")
    tracker.log_image(tmp_path / "o.png", key="val/00_referring", step=2)
    tracker.log_table({"model": ["trained", "untrained"], "cIoU": [0.5, 0.1]}, "results.json")
    tracker.log_inputs([{"name": "syn", "digest": "d1", "source": "/x/manifest.json", "count": 7, "context": "train"}])
    tracker.finish("KILLED")  # preempted
    run_id = tracker.run_id  # known once the store has the run (finish waited for it)

    again = Tracker(cfg, tmp_path / "run", active=True)
    assert again.start(None, {"train.steps": 3}, {}) == run_id  # the run dir reopens its own run
    again.log_metrics({"train/loss": 0.25}, 4)
    again.finish("FINISHED")

    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params == {"train.steps": "3", "model.name": "tiny"}
    tags = run.data.tags
    assert tags["slurm.job_id"] == "42" and "resumed_at" in tags and tags["segcap.attempts"] == "2"
    assert "segcap.attempt.1.status" not in tags  # attempt 1 closed itself (KILLED)
    assert history(uri, run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [a.path for a in c.list_artifacts(run_id, "config")] == ["config/note.txt"]
    images = [a.path for a in c.list_artifacts(run_id, "images")]
    assert any(p.startswith("images/val~00_referring+step+2+") and p.endswith(".png") for p in images)
    table = json.loads(Path(c.download_artifacts(run_id, "results.json", str(tmp_path))).read_text())
    assert table["columns"] == ["model", "cIoU"] and table["data"] == [["trained", 0.5], ["untrained", 0.1]]
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest, json.loads(inp.dataset.profile)) == ("syn", "d1", {"num_rows": 7})
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == run_id


def test_inactive_tracker_touches_nothing(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/x.db"), tmp_path / "run", active=False)
    assert tracker.start(None, {"a": 1}, {}) is None
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.finish()
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "run").exists()


def test_server_down_mid_run_loses_no_metric(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="down", max_backoff_s=2), tmp_path / "run", True)
    tracker.start(None, {}, {})
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": float(step)}, step)
    assert tracker.flush(timeout=60)
    run_id = tracker.run_id
    mlflow_server.stop()
    try:
        for step in (4, 5, 6):
            tracker.log_metrics({"train/loss": float(step)}, step)
        deadline = time.time() + 30
        while tracker.applier.failing_since is None and time.time() < deadline:
            time.sleep(0.2)
        assert tracker.applier.failing_since is not None  # the applier saw the store down
        assert tracker.journal.pending() > 0  # steps 4-6 wait in the spool
        assert not tracker.flush(timeout=30)  # returns at once while the store fails
    finally:
        mlflow_server.start()
    assert tracker.flush(timeout=90, while_failing=True)  # replayed by the background thread by itself
    tracker.finish()
    assert history(uri, run_id, "train/loss") == [(s, float(s)) for s in range(1, 7)]
    assert client(uri).get_run(run_id).info.status == "FINISHED"


def test_hung_server_costs_no_step(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    cfg = TrackingConfig(tracking_uri=uri, experiment="hung", max_backoff_s=2, request_timeout_s=3)
    tracker = Tracker(cfg, tmp_path / "run", True)
    tracker.start(None, {}, {})
    assert tracker.flush(timeout=60)
    run_id = tracker.run_id
    mlflow_server.pause()  # accepts connections, never answers
    try:
        before = tracker.call_s
        for step in range(1, 21):  # the "training loop": every call returns; the journal has them all
            tracker.log_metrics({"train/loss": float(step), "lr": 0.1}, step)
        lines = tracker.journal.spool.read_text().splitlines()
        assert sum(json.loads(ln)["op"] == "metrics" for ln in lines) == 20
        print(f"20 log_metrics calls against a hung server: {1e3 * (tracker.call_s - before):.2f} ms in total")
        time.sleep(5)
        assert tracker.journal.pending() > 0
    finally:
        mlflow_server.resume()
    assert tracker.flush(timeout=90, while_failing=True)
    tracker.finish()
    assert history(uri, run_id, "train/loss") == [(s, float(s)) for s in range(1, 21)]


KILLED_PROCESS = textwrap.dedent(
    """
    import os, signal, sys
    from launcher.config import TrackingConfig
    from launcher.tracking import Tracker
    t = Tracker(TrackingConfig(tracking_uri=sys.argv[1], experiment="kill9"), sys.argv[2], True)
    t.start(None, {"a": 1}, {})
    t.log_metrics({"train/loss": 1.0}, 1)
    assert t.flush(timeout=60)
    if sys.argv[3] == "kill9":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("boom")  # an exception: atexit closes the run FAILED
    """
)


def run_script(uri, run_dir, how, env=None):
    return subprocess.run([sys.executable, "-c", KILLED_PROCESS, uri, str(run_dir), how], check=False, cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("restart_count, expected", [("0", "FAILED"), ("1", "KILLED")])
def test_kill9_then_resume_closes_the_old_attempt(mlflow_server, tmp_path, restart_count, expected):
    """kill -9 leaves the run RUNNING; the next start of the run dir closes that attempt FAILED, or
    KILLED when Slurm requeued the job (SLURM_RESTART_COUNT went up), then continues the same run."""
    uri = mlflow_server.uri
    proc = run_script(uri, tmp_path / "run", "kill9", {"SLURM_RESTART_COUNT": "0"})
    assert proc.returncode == -9, proc.stderr
    run_id = (tmp_path / "run" / "mlflow" / "run_id").read_text()
    assert client(uri).get_run(run_id).info.status == "RUNNING"  # nobody closed it

    os.environ["SLURM_RESTART_COUNT"] = restart_count
    try:
        tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="kill9"), tmp_path / "run", True)
        assert tracker.start(None, {"a": 1}, {}) == run_id
    finally:
        del os.environ["SLURM_RESTART_COUNT"]
    assert tracker.flush(timeout=60)
    run = client(uri).get_run(run_id)
    assert run.data.tags["segcap.attempt.1.status"] == expected and run.info.status == "RUNNING"
    tracker.log_metrics({"train/loss": 0.5}, 2)
    tracker.finish()
    assert client(uri).get_run(run_id).info.status == "FINISHED"
    assert history(uri, run_id, "train/loss") == [(1, 1.0), (2, 0.5)]


def test_an_exception_closes_the_run_failed(mlflow_server, tmp_path):
    proc = run_script(mlflow_server.uri, tmp_path / "run", "raise")
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    run_id = (tmp_path / "run" / "mlflow" / "run_id").read_text()
    assert client(mlflow_server.uri).get_run(run_id).info.status == "FAILED"


def test_runs_sync_uploads_a_run_made_while_the_store_was_unreachable(mlflow_server, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(TrackingConfig(tracking_uri=dead, experiment="offline", run_name="off"), tmp_path / "run", True)
    assert tracker.start(None, {"optim.lr": 0.1}, {}) is None  # no store: no id, no wait
    for step in (1, 2):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.finish()
    tracker.close()  # the process would end here; its journal stays
    assert "runs sync" in capsys.readouterr().err  # the warning says what to do

    assert main(["runs", "sync", str(tmp_path / "run"), "--tracking-uri", mlflow_server.uri, "--timeout", "120"]) == 0
    run_id = (tmp_path / "run" / "mlflow" / "run_id").read_text()
    run = client(mlflow_server.uri).get_run(run_id)
    assert (run.info.run_name, run.info.status, run.data.params) == ("off", "FINISHED", {"optim.lr": "0.1"})
    assert history(mlflow_server.uri, run_id, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert main(["runs", "sync", str(tmp_path / "run"), "--tracking-uri", mlflow_server.uri]) == 0  # idempotent
    assert history(mlflow_server.uri, run_id, "train/loss") == [(1, 1.0), (2, 0.5)]


def test_runs_compare_shows_differing_params_metrics_and_the_ui_url(mlflow_server, tmp_path, capsys):
    ids = []
    for name, lr, losses in (("a", 0.1, [3.0, 1.0, 2.0]), ("b", 0.2, [3.0, 2.5, 2.2])):
        t = Tracker(TrackingConfig(tracking_uri=mlflow_server.uri, experiment="cmp", run_name=name), tmp_path / name, True)
        t.start(None, {"optim.lr": lr, "train.steps": 3}, {})
        for step, loss in enumerate(losses, 1):
            t.log_metrics({"train/loss": loss, "val/cIoU": step / 10}, step)
        t.finish()
        ids.append(t.run_id)
    assert main(["runs", "compare", str(tmp_path / "a"), ids[1], "--tracking-uri", mlflow_server.uri]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "params that differ (1 of 2):" in out
    assert [ln.split() for ln in lines if ln.startswith("optim.lr")] == [["optim.lr", "0.1", "0.2"]]
    # train/loss: final a 2 best a 1, final b 2.2 best b 2.2; val/cIoU max is its final
    assert [ln.split() for ln in lines if ln.startswith("train/loss")] == [["train/loss", "2", "1", "2.2", "2.2"]]
    assert [ln.split() for ln in lines if ln.startswith("val/cIoU")] == [["val/cIoU", "0.3", "0.3", "0.3", "0.3"]]
    assert f'{mlflow_server.uri}/#/compare-runs?runs=["{ids[0]}","{ids[1]}"]' in out


def test_a_call_the_store_refuses_is_set_aside_and_the_rest_applied(tmp_path):
    """A permanent refusal (here a param changed: MLflow forbids it) must not block the journal forever."""
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="refused"), tmp_path / "run", True)
    tracker.start(None, {"a": 1}, {})
    tracker.journal.append({"op": "params", "ts": 0, "params": {"a": "2"}})
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.finish()
    (rejected,) = [json.loads(ln) for ln in (tmp_path / "run/mlflow/rejected.jsonl").read_text().splitlines()]
    assert rejected["params"] == {"a": "2"} and "Changing param values is not allowed" in rejected["error"]
    run = client(uri).get_run(tracker.run_id)
    assert (run.info.status, run.data.params, run.data.metrics) == ("FINISHED", {"a": "1"}, {"x": 1.0})


def test_demo_results_table_is_logged_into_the_demo_run(tmp_path):
    from launcher.config import RunConfig
    from launcher.demo import _log_table

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = RunConfig()
    cfg.tracking.tracking_uri = uri
    tracker = Tracker(cfg.tracking, tmp_path / "run", True)
    tracker.start(None, {}, {})
    tracker.finish()
    results = {"models": {"trained": {"referring/cIoU": 0.5}, "untrained": {"referring/cIoU": 0.1, "all/gIoU": 0.2}}}
    _log_table(cfg, tmp_path / "run", results)
    path = client(uri).download_artifacts(tracker.run_id, "demo_results.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["model", "all/gIoU", "referring/cIoU"]
    assert table["data"] == [["trained", None, 0.5], ["untrained", 0.2, 0.1]]
