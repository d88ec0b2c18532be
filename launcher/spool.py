"""The MLflow journal of one run dir: every tracking call is a JSON line in <run_dir>/mlflow/spool.jsonl,
and one background thread applies the lines to the store in order, retrying with backoff while the
store is down or hangs. The byte offset of what is applied survives restarts, so a later start of the
run dir or `launcher runs sync` replays the rest.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's training view
MAX_PARAMS, MAX_METRICS = 100, 1000  # MLflow's log_batch limits
# One store call costs the background thread ~5 ms of CPU (client, HTTP): metrics logged every step are
# gathered for this long into one log_batch. A flush() skips the wait.
BATCH_INTERVAL_S = 1.0


class Journal:
    """Append-only op log of a run dir plus the files that say how far the store has it."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "mlflow"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "spool.jsonl"
        self.spool.touch()
        self._lock = threading.Lock()
        self._f = None
        self._applied: int | None = None
        self.written = threading.Condition()

    def append(self, op: dict[str, Any]) -> None:
        line = json.dumps(op, default=str) + "\n"
        with self._lock:
            if self._f is None:
                self._f = open(self.spool, "a")  # noqa: SIM115 - kept open for the run
            self._f.write(line)
            self._f.flush()  # the applier reads the file, and a kill -9 must not lose the line
        with self.written:
            self.written.notify_all()

    def size(self) -> int:
        return self.spool.stat().st_size

    @property
    def applied(self) -> int:
        if self._applied is not None:  # this process applies the journal: its own count is the truth
            return self._applied
        p = self.dir / "applied"
        return int(p.read_text()) if p.exists() else 0

    def set_applied(self, offset: int) -> None:
        tmp = self.dir / "applied.tmp"
        tmp.write_text(str(offset))
        tmp.replace(self.dir / "applied")
        self._applied = offset

    def run_id(self) -> str | None:
        p = self.dir / "run_id"
        return p.read_text().strip() or None if p.exists() else None

    def pending(self) -> int:
        return self.size() - self.applied

    def lock(self) -> int | None:
        """An exclusive flock on the journal (one applier per run dir; a killed holder frees it)."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None


class Applier(threading.Thread):
    """Applies the journal's lines to the store. Never raises into training: a failing call is retried
    with exponential backoff (1 s .. max_backoff_s) and the lines stay in the spool meanwhile."""

    def __init__(self, journal: Journal, uri: str, max_backoff_s: float = 30.0, run_dir: str | Path = "",
                 hang_s: float = 20.0):
        super().__init__(name="segcap-mlflow", daemon=True)  # a daemon: process exit never waits on MLflow
        self.journal, self.uri, self.max_backoff_s = journal, uri, max_backoff_s
        self.hang_s = hang_s  # a store call busy this long counts as a hung store
        self.run_dir = str(run_dir or journal.dir.parent)
        self.stop_when_drained = False
        self.stopped = threading.Event()  # close(): leave the rest in the spool
        self.hurry = threading.Event()  # a flush is waiting: apply without gathering
        self._last_apply = 0.0
        self.failing_since: float | None = None  # None while the store answers
        self.call_started: float | None = None  # when the current store call began (a hang shows here)
        self.error: str = ""
        self.applied_ops = 0
        self.cpu_s = 0.0  # CPU time of successful applies (the benchmark's background share)
        self._client = None

    # --- health, as seen from the training thread
    def healthy(self) -> bool:
        busy = self.call_started is not None and time.monotonic() - self.call_started > self.hang_s
        return self.failing_since is None and not busy

    def wait_drained(self, timeout: float, while_failing: bool = False) -> bool:
        """Wait until the spool is applied, giving up after `timeout` s without progress; unless
        `while_failing`, give up as soon as the store fails or hangs."""
        deadline, last = time.monotonic() + timeout, self.journal.applied
        self.hurry.set()
        try:
            while self.journal.pending() > 0:
                if self.journal.applied != last:  # a slow store that makes progress is waited for
                    deadline, last = time.monotonic() + timeout, self.journal.applied
                if time.monotonic() > deadline or not self.is_alive() or (not while_failing and not self.healthy()):
                    return False
                time.sleep(0.02)
            return True
        finally:
            self.hurry.clear()

    # --- the thread
    def run(self) -> None:
        backoff = 1.0
        while not self.stopped.is_set():
            offset, size = self.journal.applied, self.journal.size()
            if offset >= size:
                if self.stop_when_drained:
                    return
                with self.journal.written:
                    self.journal.written.wait(timeout=0.5)
                continue
            wait = self._last_apply + BATCH_INTERVAL_S - time.monotonic()
            if wait > 0 and not self.hurry.is_set() and not self.stop_when_drained:
                self.hurry.wait(wait)  # gather more lines into one call
                continue
            cpu0 = time.thread_time()
            lines, end = self._read(offset, size)
            if not lines:  # only a line still being written
                self.stopped.wait(0.05)
                continue
            try:
                self.client  # noqa: B018 - import and build it first: a slow import is not a hung store
                self.call_started = time.monotonic()
                self._apply(lines)
                self.call_started = None
            except Exception as e:  # noqa: BLE001 - any store error: keep the lines, retry later
                self.call_started = None
                if _permanent(e):  # retrying cannot help (a changed param, a deleted file): set it aside
                    self._reject(lines, e)
                    self.journal.set_applied(end)
                    continue
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    print(
                        f"[segcap] warning: MLflow store {self.uri} failed ({type(e).__name__}: {str(e)[:200]}); "
                        f"training continues, tracking calls are spooled to {self.journal.spool} and retried in "
                        f"the background (or run `python -m launcher runs sync {self.run_dir}` later)",
                        file=sys.stderr,
                        flush=True,
                    )
                self.error = f"{type(e).__name__}: {e}"
                if self.stop_when_drained and backoff >= self.max_backoff_s:
                    return
                self.stopped.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self.journal.set_applied(end)
            self._last_apply = time.monotonic()
            self.applied_ops += len(lines)
            self.cpu_s += time.thread_time() - cpu0
            if self.failing_since is not None:
                down = time.monotonic() - self.failing_since
                print(f"[segcap] MLflow store {self.uri} is back after {down:.0f} s; spooled calls replayed",
                      file=sys.stderr, flush=True)
                self.failing_since, backoff = None, 1.0

    def _reject(self, lines: list[dict], e: Exception) -> None:
        with open(self.journal.dir / "rejected.jsonl", "a") as f:
            f.writelines(json.dumps({**op, "error": f"{type(e).__name__}: {e}"[:2000]}) + "\n" for op in lines)
        print(f"[segcap] warning: MLflow rejected {lines[0]['op']} ({type(e).__name__}: {str(e)[:300]}); "
              f"set aside in {self.journal.dir / 'rejected.jsonl'}", file=sys.stderr, flush=True)

    def _read(self, offset: int, size: int) -> tuple[list[dict], int]:
        """Whole lines from `offset`: one non-metric op, or a run of metric ops up to MLflow's batch limit."""
        with open(self.journal.spool, "rb") as f:
            f.seek(offset)
            data = f.read(min(size - offset, 4 << 20))
        ops, pos, n_metrics = [], offset, 0
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # a line still being written
            op = json.loads(raw)
            if op["op"] != "metrics":
                if not ops:
                    ops, pos = [op], pos + len(raw)
                break
            if ops and n_metrics + len(op["m"]) > MAX_METRICS:
                break
            ops.append(op)
            n_metrics += len(op["m"])
            pos += len(raw)
        return ops, pos

    # --- the store side
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _run_id(self) -> str:
        run_id = self.journal.run_id()
        if run_id is None:
            raise RuntimeError("no MLflow run yet (the spool's start line was not applied)")
        return run_id

    def _apply(self, ops: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if ops[0]["op"] == "metrics":
            batch = [Metric(k, float(v), op["ts"], op["step"]) for op in ops for k, v in op["m"].items()]
            self.client.log_batch(self._run_id(), metrics=batch)
            return
        op = ops[0]
        kind = op["op"]
        if kind == "start":
            self._start(op)
        elif kind == "attempt":
            self._attempt(op)
        elif kind == "params":
            items = [Param(k, v) for k, v in sorted(op["params"].items())]
            for i in range(0, len(items), MAX_PARAMS):
                self.client.log_batch(self._run_id(), params=items[i : i + MAX_PARAMS])
        elif kind == "tags":
            self.client.log_batch(self._run_id(), tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifact":
            self.client.log_artifact(self._run_id(), op["path"], op.get("dest"))
        elif kind == "image":
            from PIL import Image

            with Image.open(op["path"]) as img:
                self.client.log_image(self._run_id(), img.convert("RGB"), key=op["key"], step=op["step"],
                                      timestamp=op["ts"], synchronous=True)
        elif kind == "table":
            self.client.log_table(self._run_id(), data=op["data"], artifact_file=op["file"])
        elif kind == "inputs":
            self._inputs(op)
        elif kind == "end":
            self.client.set_terminated(self._run_id(), status=op["status"], end_time=op["ts"])
        else:
            raise ValueError(f"{self.journal.spool}: unknown op {kind!r}")

    def _start(self, op: dict) -> None:
        if self.journal.run_id():
            return  # applied before the offset was saved
        exp = self.client.get_experiment_by_name(op["experiment"])
        if exp is None:
            exp_id = self.client.create_experiment(op["experiment"], op.get("artifact_location"), tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            if "mlflow.experimentKind" not in exp.tags:
                self.client.set_experiment_tag(exp_id, *next(iter(EXPERIMENT_KIND.items())))
        if op.get("run_id"):  # an existing run (MLFLOW_RUN_ID, or a checkpoint's id without a journal)
            run_id = op["run_id"]
            self.client.get_run(run_id)
            if op.get("reopen"):  # a training start, not an attach: the run is running again
                self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(exp_id, run_name=op.get("run_name"), tags=op.get("tags") or {},
                                            start_time=op["ts"]).info.run_id
        tmp = self.journal.dir / "run_id.tmp"
        tmp.write_text(run_id)
        tmp.replace(self.journal.dir / "run_id")
        (self.journal.dir.parent / "mlflow_run_id").write_text(run_id)  # the id where users and scripts look

    def _attempt(self, op: dict) -> None:
        """A new start of the run dir: close the previous attempt if it never closed itself, reopen the run."""
        from mlflow.entities import RunTag

        run_id = self._run_id()
        tags = [RunTag("segcap.attempts", str(op["n"])), RunTag(f"segcap.attempt.{op['n']}.started", op["when"])]
        if op.get("stale"):
            prev = self.client.get_run(run_id).info.status
            if prev == "RUNNING":
                self.client.set_terminated(run_id, status=op["stale"], end_time=op["ts"])
            tags.append(RunTag(f"segcap.attempt.{op['n'] - 1}.status", op["stale"]))
        self.client.log_batch(run_id, tags=tags)
        if op["n"] > 1:
            self.client.update_run(run_id, status="RUNNING")

    def _inputs(self, op: dict) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(d["name"], d["digest"], "local", json.dumps({"uri": d["source"]}),
                        profile=json.dumps({"num_rows": d["count"]})),
                tags=[InputTag("mlflow.data.context", d["context"])],
            )
            for d in op["datasets"]
        ]
        self.client.log_inputs(self._run_id(), datasets=inputs)


def _permanent(e: Exception) -> bool:
    """A request the store understood and refused (HTTP 4xx but 429), or a file that is gone."""
    if isinstance(e, FileNotFoundError):
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return 400 <= code < 500 and code != 429
    return False


def sync(run_dir: str | Path, uri: str, timeout: float = 300.0) -> int:
    """Upload what a run dir's spool holds that the store does not; returns the number of bytes left."""
    journal = Journal(run_dir)
    fd = journal.lock()
    if fd is None:
        raise RuntimeError(f"{journal.dir}: another process (a live run?) is applying this journal")
    try:
        applier = Applier(journal, uri, max_backoff_s=min(8.0, timeout), run_dir=run_dir)
        applier.stop_when_drained = True
        applier.start()
        applier.join(timeout)
        if applier.error and journal.pending():
            print(f"[segcap] sync stopped: {applier.error}", file=sys.stderr)
        return journal.pending()
    finally:
        os.close(fd)
