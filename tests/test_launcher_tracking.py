"""The Tracker against a real MLflow tracking server (what a cluster uses), started by the test."""

import subprocess
import sys
import time
import urllib.request

import pytest

from launcher.config import TrackingConfig
from launcher.dist import free_port
from launcher.tracking import Tracker

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited: " + proc.stderr.read()[-2000:])
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_tracker_logs_params_metrics_artifacts_and_resumes_same_run(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment="server-test", run_name="t")
    tracker = Tracker(cfg, tmp_path / "run", active=True)
    run_id = tracker.start(None, {"train.steps": 3, "model.name": "tiny"}, {"slurm.job_id": "42"})
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt", "config")
    tracker.finish("KILLED")  # preempted

    again = Tracker(cfg, tmp_path / "run", active=True)
    assert again.start(run_id, {}, {}) == run_id  # the requeued job reopens the same run
    again.log_metrics({"train/loss": 0.25}, 4)
    again.finish("FINISHED")

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "3", "model.name": "tiny"}
    assert run.data.tags["slurm.job_id"] == "42" and "resumed_at" in run.data.tags
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert hist == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/note.txt"]


def test_inactive_tracker_touches_nothing(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/x.db"), tmp_path / "run", active=False)
    assert tracker.start(None, {"a": 1}, {}) is None
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.finish()
    assert not (tmp_path / "x.db").exists()
