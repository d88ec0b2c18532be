"""launcher.dist's exit path: a process that was in a gloo group ends with its exit code after its exit
handlers ran and its output was flushed, without Python's interpreter finalization (the SIGABRT race
in docs/LEARNED.md); a process that never joined a group exits the ordinary way."""

import subprocess
import sys

import pytest

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
