"""MLflow tracking from rank 0: what a run records (params, metrics, inputs, images, tables, status).

Every call appends one line to the run dir's journal (launcher/spool.py) and returns; a background
thread applies the lines to the store, so a store that is down or hangs never stops a step. Other
ranks get a Tracker whose calls do nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from launcher.config import TrackingConfig
from launcher.spool import Applier, Journal

MAX_PARAM_LEN = 6000  # MLflow's limit for a param value
PACKAGES = ("segcap", "torch", "deepspeed", "transformers", "peft", "webdataset", "triton", "mlflow")
SLURM_FIELDS = {
    "SLURM_JOB_ID": "slurm.job_id",
    "SLURM_JOB_NAME": "slurm.job_name",
    "SLURM_JOB_NODELIST": "slurm.nodelist",
    "SLURM_JOB_NUM_NODES": "slurm.num_nodes",
    "SLURM_JOB_PARTITION": "slurm.partition",
    "SLURM_JOB_ACCOUNT": "slurm.account",
    "SLURM_RESTART_COUNT": "slurm.restart_count",
}
# MLflow's HTTP settings the user set: those win over tracking.request_timeout_s.
_USER_ENV = {k for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT") if k in os.environ}


def default_tracking_uri(output_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the folder that holds the run directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


class Tracker:
    def __init__(self, cfg: TrackingConfig, output_dir: str | Path, active: bool):
        self.active = active and cfg.enabled
        self.cfg = cfg
        self.run_dir = Path(output_dir)
        self.uri = cfg.tracking_uri or default_tracking_uri(output_dir)
        self.call_s = 0.0  # time the calling (training) thread spent in tracker calls: the overhead
        self.journal: Journal | None = None
        self.applier: Applier | None = None
        self._given_run_id: str | None = None
        self._open = False  # started and not finished
        if self.active:
            # Retries are ours, in the background; a hung server must not hold a store call for minutes.
            if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in _USER_ENV:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            if "MLFLOW_HTTP_REQUEST_TIMEOUT" not in _USER_ENV:
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(cfg.request_timeout_s)))
            self.journal, self.applier = _applier_for(self.run_dir, self.uri, cfg)

    @property
    def run_id(self) -> str | None:
        return (self.journal.run_id() if self.journal else None) or self._given_run_id

    def start(self, run_id: str | None, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Open this run dir's MLflow run: a new one, or, on a later start of the same run dir, the same
        one again (closing the previous attempt as FAILED, or KILLED if Slurm requeued the job, when it
        never closed itself). `run_id` attaches a run dir without a journal to an existing run."""
        if not self.active:
            return None
        t0 = time.perf_counter()
        state_file = self.journal.dir / "attempt.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else None
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if state is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", self.cfg.experiment)
            self._append("start", experiment=name, run_name=self.cfg.run_name, tags=tags, run_id=run_id,
                         reopen=run_id is not None, artifact_location=self._artifact_location(name))
            self._append("attempt", n=1, stale=None, when=_when())
            params = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}
            self._append("params", params=params)
            n = 1
        else:
            n = state["n"] + 1
            stale = None
            if state["open"]:
                stale = "KILLED" if restart > state.get("restart_count", 0) else "FAILED"
            self._append("attempt", n=n, stale=stale, when=_when())
            self._append("tags", tags={**{k: str(v) for k, v in tags.items()}, "resumed_at": _when()})
        state_file.write_text(json.dumps({"n": n, "open": True, "restart_count": restart}))
        self._open = True
        atexit.register(self._exit_unfinished)  # an exception or sys.exit before finish(): FAILED
        self.call_s += time.perf_counter() - t0
        deadline = time.monotonic() + self.cfg.start_wait_s  # the id for checkpoints, if the store is quick
        while self.run_id is None and self.applier and self.applier.healthy() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.run_id

    @property
    def has_run(self) -> bool:
        """This run dir has a run (or one on its way to the store): attach() logs into it."""
        return bool(self.journal) and (self.journal.run_id() is not None or (self.journal.dir / "attempt.json").exists())

    def attach(self, run_id: str | None = None) -> None:
        """Log into this run dir's run (or `run_id` when the run dir has none) without changing its status."""
        if not self.active:
            return
        if self.journal.run_id() is None and not (self.journal.dir / "attempt.json").exists():
            if run_id is None:
                raise ValueError(f"{self.run_dir}: no MLflow run to attach to (no journal, no run id)")
            self._given_run_id = run_id
            self._append("start", experiment=self.cfg.experiment, run_id=run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            self._append("metrics", step=int(step), m={k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._append("artifact", path=str(Path(path).resolve()), dest=artifact_path)

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """A PNG as an MLflow image with its step: the UI's image slider walks the steps of one key."""
        if self.active:
            self._append("image", path=str(Path(path).resolve()), key=key, step=int(step))

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """Columns of equal length, shown by the UI as a table (artifact_file ends in .json)."""
        if self.active:
            self._append("table", data=data, file=artifact_file)

    def log_inputs(self, datasets: list[dict]) -> None:
        """Datasets the run saw: dicts with name, digest, source, count, context (see dataset_inputs)."""
        if self.active and datasets:
            self._append("inputs", datasets=datasets)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and tags:
            self._append("tags", tags={k: str(v) for k, v in tags.items()})

    def flush(self, timeout: float | None = None, while_failing: bool = False) -> bool:
        """Wait (bounded, and not at all while the store fails unless `while_failing`) until the store
        has every call so far."""
        if not self.active:
            return True
        done = self.journal.pending() == 0
        if self.applier is not None and not done:
            done = self.applier.wait_drained(self.cfg.flush_timeout_s if timeout is None else timeout, while_failing)
        if not done:
            print(
                f"[segcap] warning: {self.journal.pending()} bytes of MLflow calls not yet in {self.uri}; they stay "
                f"in {self.journal.spool} (retried while this process lives; afterwards: "
                f"python -m launcher runs sync {self.run_dir})",
                file=sys.stderr,
                flush=True,
            )
        return done

    def finish(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED, or KILLED (preempted: the requeued job reopens the run). Closes the
        run only if this tracker started it; an attached tracker just flushes."""
        if not self.active:
            return
        if self._open:
            self._open = False
            self._append("end", status=status)
            state_file = self.journal.dir / "attempt.json"
            state = json.loads(state_file.read_text()) if state_file.exists() else {"n": 0}
            state_file.write_text(json.dumps({**state, "open": False, "status": status}))
        self.flush()

    def close(self) -> None:
        """Stop the background thread now (what it has not applied stays in the spool) and free the journal."""
        entry = _APPLIERS.pop(self.journal.dir, None) if self.journal else None
        if entry is not None:
            _, applier, fd = entry
            if applier is not None:
                applier.stopped.set()
                applier.join(timeout=10)
            if fd is not None:
                os.close(fd)
        self.applier = None

    def _exit_unfinished(self) -> None:
        if self._open:
            self.finish("FAILED")

    def _append(self, op: str, **fields: Any) -> None:
        t0 = time.perf_counter()
        self.journal.append({"op": op, "ts": _now_ms(), **fields})
        self.call_s += time.perf_counter() - t0

    def _artifact_location(self, experiment: str) -> str | None:
        """File stores keep artifacts beside the run dir; a server decides itself (--artifacts-destination)."""
        if self.uri.startswith(("http://", "https://", "databricks")):
            return None
        return (self.run_dir.resolve().parent / "mlartifacts").as_uri() + f"/{experiment}"


_APPLIERS: dict[Path, tuple[Journal, Applier | None, int | None]] = {}  # one per run dir and process


def _applier_for(run_dir: Path, uri: str, cfg: TrackingConfig) -> tuple[Journal, Applier | None]:
    """The run dir's journal and this process's applier of it (None when another live process holds
    the journal: that one applies what we append)."""
    key = (Path(run_dir) / "mlflow").resolve()
    if key not in _APPLIERS:
        journal = Journal(run_dir)
        (journal.dir / "uri").write_text(uri)
        fd = journal.lock()
        applier = None
        if fd is not None:
            # A call busy past the HTTP timeout (plus slack for a loaded machine) is a hung store.
            applier = Applier(journal, uri, cfg.max_backoff_s, run_dir, hang_s=cfg.request_timeout_s + 10)
            applier.start()
        _APPLIERS[key] = (journal, applier, fd)
    journal, applier, _ = _APPLIERS[key]
    return journal, applier


def run_params(cfg_flat: dict[str, Any], ds_config: dict, world_size: int) -> dict[str, Any]:
    """Everything a comparison of two runs needs: the validated config, the rendered DeepSpeed JSON,
    the code (git commit, dirty flag), package versions, world size and the Slurm job fields."""
    from launcher.config import flatten

    params = dict(cfg_flat)
    params.update({f"deepspeed.{k}": v for k, v in flatten(ds_config).items()})
    commit, dirty = _git_state()
    params.update({"git.commit": commit or "unknown", "git.dirty": dirty, "world_size": world_size})
    for pkg in PACKAGES:
        try:
            params[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            params[f"version.{pkg}"] = "not installed"
    params.update({tag: os.environ[env] for env, tag in SLURM_FIELDS.items() if os.environ.get(env)})
    return params


def run_tags(world_size: int) -> dict[str, str]:
    """Where and what ran: Slurm job, nodes, world size, git commit."""
    tags = {"world_size": str(world_size)}
    tags.update({tag: os.environ[env] for env, tag in SLURM_FIELDS.items() if os.environ.get(env)})
    commit, _ = _git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def dataset_inputs(sources: list, context: str) -> list[dict]:
    """One MLflow input per shard folder: its manifest's sha256 as digest and its sample count."""
    from datapipes.shards import MANIFEST

    out = []
    for s in sources:
        manifest = Path(s.path) / MANIFEST
        raw = manifest.read_bytes()
        out.append({"name": s.name, "digest": hashlib.sha256(raw).hexdigest()[:16], "source": str(manifest.resolve()),
                    "count": int(json.loads(raw)["total"]), "context": context})
    return out


def _git_state() -> tuple[str | None, bool]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None, False
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=here,
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() or None, bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _when() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
