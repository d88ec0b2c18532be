"""Run a function on N real processes joined in a gloo process group (DS_ACCELERATOR=cpu) and collect
what each rank returned. A hang fails with TimeoutError after `timeout` seconds instead of stalling
the test run; an exception on any rank fails the call with that rank's traceback."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher import dist as launcher_dist


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 120.0,
    workdir: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Call fn(*args) on `world_size` spawned ranks; returns [result of rank 0, rank 1, ...].

    `fn` must be importable by name (a module-level function). Inside it, torch.distributed is
    initialised (gloo) and RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* are set, so
    deepspeed.initialize and dist.get_rank() work. Results travel through torch.save files.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # children inherit it before they import deepspeed
    out_dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dist_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    port = launcher_dist.free_port()
    ctx = mp.start_processes(
        _worker,
        args=(fn, args, world_size, port, str(out_dir), timeout, env or {}),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(f"distributed run of {fn.__name__} did not finish within {timeout:.0f} s (hang?)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _worker(rank: int, fn, args, world_size: int, port: int, out_dir: str, timeout: float, env: dict) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            **env,
        }
    )
    torch.set_num_threads(1)  # N ranks share the machine's cores
    # The parent's join timeout must fire first (a clean TimeoutError), not gloo's own.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout + 60))
    # An exception leaves through spawn's error file (the parent raises it with this rank's traceback).
    result = fn(*args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    # The same orderly end as `python -m launcher`: a gloo thread still releasing the last collective's
    # tensors while Python finalizes aborts the rank (SIGABRT); see launcher.dist.exit_process.
    launcher_dist.finish()
    launcher_dist.exit_process(0)
