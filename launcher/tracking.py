"""MLflow tracking from rank 0: params, tags, metrics, artifacts and images of one run.

Metrics go through MlflowClient.log_batch(synchronous=False): MLflow queues them on its own thread,
so a logging step costs the training step almost nothing. A resumed run logs into the same MLflow run
(its id travels in the checkpoint). Other ranks get a Tracker whose calls do nothing.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from launcher.config import TrackingConfig

MAX_PARAM_LEN = 6000  # MLflow's limit for a param value


def default_tracking_uri(output_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the folder that holds the run directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


class Tracker:
    def __init__(self, cfg: TrackingConfig, output_dir: str | Path, active: bool):
        self.active = active and cfg.enabled
        self.cfg = cfg
        self.run_id: str | None = None
        self.uri = cfg.tracking_uri or default_tracking_uri(output_dir)
        self.artifact_root = Path(output_dir).resolve().parent / "mlartifacts"
        if self.active:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)

    def start(self, run_id: str | None, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Open the run `run_id` (resume) or a new one; returns its id."""
        if not self.active:
            return None
        from mlflow.entities import Param, RunTag

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", self.cfg.experiment)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            exp_id = self.client.create_experiment(name, artifact_location=self.artifact_root.as_uri() + f"/{name}")
        else:
            exp_id = exp.experiment_id
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.client.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return run_id
        run = self.client.create_run(exp_id, run_name=self.cfg.run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return self.run_id

    def attach(self, run_id: str) -> None:
        """Log into an existing run without changing its status (e.g. after training ended)."""
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=False)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def flush(self) -> None:
        """Wait until the asynchronous metric batches are written."""
        if self.active:
            import mlflow

            mlflow.flush_async_logging()

    def finish(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED, or KILLED (preempted: the requeued job reopens the run)."""
        if not self.active:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def run_tags(world_size: int) -> dict[str, str]:
    """Where and what ran: Slurm job, nodes, world size, git commit."""
    tags = {"world_size": str(world_size)}
    for env, tag in (
        ("SLURM_JOB_ID", "slurm.job_id"),
        ("SLURM_JOB_NODELIST", "slurm.nodelist"),
        ("SLURM_JOB_NAME", "slurm.job_name"),
        ("SLURM_RESTART_COUNT", "slurm.restart_count"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
