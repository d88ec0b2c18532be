"""A real MLflow tracking server on a real PostgreSQL, started through slurm/mlflow_server.sh (so the
tests run the script users run). Session-scoped: the first start creates the tables (~1 min on 2 cores).
Without PostgreSQL or psycopg2 the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from unavailable import unavailable

REPO = Path(__file__).resolve().parent.parent


def need(what: str) -> None:
    """Skip for a missing system piece; under CI a failure (scripts/install_services.sh installs them)."""
    unavailable(what)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """slurm/mlflow_server.sh in its own process group: stop/start it, or SIGSTOP it (a hung server)."""

    def __init__(self, root: Path):
        self.root, self.port, self.pg_port = root, free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> None:
        env = {**os.environ, "SEGCAP_MLFLOW_DIR": str(self.root), "SEGCAP_MLFLOW_HOST": "127.0.0.1",
               "SEGCAP_MLFLOW_PORT": str(self.port), "SEGCAP_PG_PORT": str(self.pg_port),
               "SEGCAP_MLFLOW_WORKERS": "1", "SEGCAP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(["bash", str(REPO / "slurm/mlflow_server.sh")], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    pytest.fail(f"slurm/mlflow_server.sh exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server not up in {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """The script's own shutdown (SIGTERM: server, then PostgreSQL); SIGKILL and an immediate
        PostgreSQL stop if it takes too long."""
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        data = self.root / "postgres" / "data"
        if (data / "postmaster.pid").exists():  # the script was killed before it stopped PostgreSQL
            pg_ctl = shutil.which("pg_ctl") or max(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
            cmd = [pg_ctl, "-D", str(data), "-m", "immediate", "stop"]
            subprocess.run((["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + cmd,
                           check=False, capture_output=True, timeout=60)

    def pause(self) -> None:
        """Every process of the server (and its PostgreSQL) stops answering; connections still open."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGCONT)


def _postgres_available() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        need("psycopg2 is not installed (pip install psycopg2-binary)")
    if not (shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        need("PostgreSQL is not installed (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            need("running as root without a `postgres` user to run PostgreSQL as")


@pytest.fixture(scope="session")
def mlflow_server():
    _postgres_available()
    # Not under pytest's tmp dir: that one is private to root, and PostgreSQL runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="segcap-mlflow-"))
    root.chmod(0o755)
    server = MlflowServer(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
