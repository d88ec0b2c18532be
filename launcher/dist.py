"""Distributed identity from torchrun's or Slurm's environment, and process-group setup.

torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; `srun` one-task-per-rank sets SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS. CPU runs use gloo with DeepSpeed's CPU accelerator, GPU runs NCCL.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str  # "gloo" | "nccl"
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.backend != "nccl":
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())  # see init()


def identity(env: dict | None = None) -> DistInfo:
    """Who am I? torchrun's variables win over Slurm's (torchrun under srun sets both)."""
    env = os.environ if env is None else env
    backend = "nccl" if torch.cuda.is_available() and env.get("DS_ACCELERATOR", "cuda") != "cpu" else "gloo"
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), backend, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistInfo(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), backend, "slurm"
        )
    return DistInfo(0, 0, 1, backend, "single")


def init(info: DistInfo) -> None:
    """Export the torchrun variables DeepSpeed reads, pick the accelerator, and join the group.

    A single process still gets a (world size 1) group: DeepSpeed's engine expects one.
    """
    if info.backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if info.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set: launch with torchrun or export MASTER_ADDR/MASTER_PORT")
        os.environ["MASTER_PORT"] = str(free_port())
    if info.backend == "nccl":
        # Slurm may bind one GPU per task (CUDA_VISIBLE_DEVICES holds one id): local rank 3 then sees device 0.
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    warn_stale_extension_locks()
    if not torch_dist.is_initialized():
        import deepspeed  # imported late: it reads DS_ACCELERATOR at import time

        deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)


STALE_LOCK_S = 600  # no op build here takes 10 minutes; a lock that old was left by a killed build


def extensions_dir(env: dict | None = None) -> Path:
    """Where torch's cpp_extension builds DeepSpeed's JIT ops (TORCH_EXTENSIONS_DIR, else its default)."""
    env = os.environ if env is None else env
    return Path(env.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def warn_stale_extension_locks(env: dict | None = None, now: float | None = None) -> list[Path]:
    """Name every op-build lock older than STALE_LOCK_S, once, on stderr.

    torch's FileBaton waits for such a lock forever and says nothing: a process killed mid-build
    leaves one, and every later process that needs the op (deepspeed_shm_comm on CPU, FusedAdam on
    GPU) hangs silently. A per-job TORCH_EXTENSIONS_DIR (slurm/common.sh) avoids sharing one.
    """
    root = extensions_dir(env)
    now = time.time() if now is None else now
    stale = sorted(p for p in root.glob("*/*/lock") if now - p.stat().st_mtime > STALE_LOCK_S) if root.is_dir() else []
    for lock in stale:
        age = (now - lock.stat().st_mtime) / 60
        print(f"[segcap] WARNING: op-build lock {lock} is {age:.0f} min old: a killed build left it and the "
              f"next DeepSpeed op build will wait on it forever; delete it if no build is running", file=sys.stderr)
    return stale


_joined = False  # this process was in a process group: its gloo/NCCL threads live until the process ends


def finish() -> None:
    """Leave the process group together: every rank reaches this point, then the groups are destroyed."""
    global _joined
    if torch_dist.is_initialized():
        _joined = True
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with `code`; after a process group was joined, without Python's finalization.

    The collective backend's worker threads outlive destroy_process_group (DeepSpeed and every ZeRO-3
    parameter keep the groups referenced) and may still be dropping the last collective's tensors when
    the main thread returns. If a tensor's Python object goes with it after the interpreter started
    finalizing, the thread's GIL request ends it with pthread_exit inside a noexcept destructor: SIGABRT,
    "terminate called without an active exception", and the launcher reports a finished run as failed
    (docs/LEARNED.md). The exit handlers (MLflow, logging, multiprocessing) still run, stdio is flushed.
    """
    if not (_joined or torch_dist.is_initialized()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank raised the flag (preemption, time budget)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch_dist.is_initialized():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()
