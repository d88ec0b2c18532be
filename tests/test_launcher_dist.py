"""launcher.dist's exit path: a process that was in a gloo group ends with its exit code after its exit
handlers ran and its output was flushed, without Python's interpreter finalization (the SIGABRT race
in docs/LEARNED.md); a process that never joined a group exits the ordinary way. Also: stale op-build locks are named, and a
GPU rank's device is its local rank modulo the visible devices."""

import os
import subprocess
import sys

import pytest
import torch

from launcher.dist import free_port

SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
from launcher import dist as ld

class Finalized:
    def __del__(self):
        print("finalized", flush=True)  # module globals are torn down only by finalization

keep = Finalized()
atexit.register(print, "exit handler ran")
if sys.argv[1] == "group":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
print("buffered", end="")  # no newline, stdout a pipe: lost unless flushed
ld.finish()
ld.exit_process(3)
"""


@pytest.mark.parametrize("mode", ["group", "none"])
def test_exit_process_runs_exit_handlers_flushes_and_skips_finalization_after_a_group(mode):
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(free_port())], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 3, p.stderr
    assert "buffered" in p.stdout and "exit handler ran" in p.stdout
    # finalization skipped after a group, ordinary exit without one (the control)
    assert ("finalized" in p.stdout) == (mode == "none"), p.stdout


def test_an_old_op_build_lock_is_named_and_a_fresh_one_is_not(tmp_path, capsys):
    from launcher.dist import STALE_LOCK_S, warn_stale_extension_locks

    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    now = fresh.stat().st_mtime + 5
    os.utime(old, (now - STALE_LOCK_S - 60, now - STALE_LOCK_S - 60))
    assert warn_stale_extension_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path)}, now=now) == [old]
    err = capsys.readouterr().err
    assert str(old) in err and "11 min old" in err and str(fresh) not in err


def test_no_extensions_dir_means_no_warning(tmp_path, capsys):
    from launcher.dist import warn_stale_extension_locks

    assert warn_stale_extension_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path / "absent")}) == []
    assert capsys.readouterr().err == ""


def test_a_gpu_rank_takes_its_local_rank_modulo_the_visible_devices(monkeypatch):
    """Slurm binding one GPU per task leaves each rank one visible device, whatever its local rank."""
    from launcher.dist import DistInfo

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert DistInfo(3, 3, 4, "nccl", "slurm").device == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert DistInfo(3, 3, 4, "nccl", "slurm").device == torch.device("cuda", 3)
