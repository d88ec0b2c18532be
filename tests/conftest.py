"""Shared pytest setup. Environment first: these must be set before triton or deepspeed is imported."""

import os

# kernels.msda: Triton kernels run on CPU in the interpreter, chosen when @triton.jit runs at import time.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed on CPU-only machines.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# --- Slurm tests (tests/slurm_cluster.py, tests/test_slurm_*.py) --------------------------------------
# The fixtures slurm_1node / slurm_2node give a test a real Slurm cluster on this machine (root and
# Debian's slurm packages: scripts/install_slurm.sh); the markers are registered here as well as in
# pytest.ini so either file alone is enough.
from slurm_cluster import _slurm_1node_session, _slurm_2node_session, slurm_1node, slurm_2node  # noqa: F401

# --- MLflow tests: mlflow_server is a real tracking server on PostgreSQL (tests/mlflow_stack.py), one per session.
from mlflow_stack import mlflow_server  # noqa: F401,E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: starts a real Slurm cluster (root, Debian slurm packages)")
    config.addinivalue_line("markers", "slow: takes more than ~10 s")
