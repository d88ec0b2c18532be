"""Checkpoints that are complete or ignored: every rank saves its DeepSpeed shards (frozen weights
excluded) plus its RNG state; after a barrier rank 0 writes a COMPLETE marker atomically. Resume only
ever picks a directory with the marker, so a save cut off by preemption or a crash is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.dist import DistInfo, barrier

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def latest_complete(ckpt_dir: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; a damaged one is reported
    (naming the file) and passed over for the one before."""
    for path in reversed(complete_checkpoints(ckpt_dir)):
        problem = manifest_problem(path) if verify else None
        if problem is None:
            return path
        print(f"[segcap] checkpoint {path} refused: {problem}; trying the previous one", flush=True)
    return None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, info: DistInfo, keep: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if info.is_main and path.exists():  # leftovers of an interrupted save of this same step
        shutil.rmtree(path)
    barrier()
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )
        torch.save(rng_state(), path / f"rng_rank{info.rank:05d}.pt")
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error; torch.save reports ENOSPC as
        free = shutil.disk_usage(ckpt_dir).free  # "enforce fail ... unexpected pos", hence the free space
        full = ": the disk is full" if free < 2**20 else ""
        raise SaveError(f"checkpoint save of step {step} to {path} failed on rank {info.rank}: {e} ({free} bytes "
                        f"free there{full}). It is not marked {MARKER} and will not be resumed from; the previous "
                        f"one is untouched") from e
    barrier()
    if info.is_main:
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "world_size": info.world_size, "files": file_manifest(path)}))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, path / MARKER)
        _prune(ckpt_dir, keep)
    barrier()
    return path


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop incomplete ones older than the newest complete."""
    done = complete_checkpoints(ckpt_dir)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    newest = _step_of(done[-1])
    for p in ckpt_dir.glob("step_*"):
        if not (p / MARKER).exists() and _step_of(p) < newest:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, path: Path, info: DistInfo) -> dict:
    """Restore model/optimizer/scheduler shards, this rank's RNG, and return the client state."""
    marker = json.loads((path / MARKER).read_text())
    if marker["world_size"] != info.world_size:
        # ZeRO shards are per rank; DeepSpeed's universal checkpoint would be needed to change it.
        raise RuntimeError(
            f"checkpoint {path} was written by {marker['world_size']} ranks, this run has {info.world_size}"
        )
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rng_file = path / f"rng_rank{info.rank:05d}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


# --- manifest: sizes and checksums written with the marker, checked before a resume -------------------

class SaveError(RuntimeError):
    """A checkpoint could not be written (the run stops: training on without checkpoints loses work)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(path: Path) -> dict[str, dict]:
    """{relative file name: {size, sha256}} of every file of a checkpoint directory but the marker."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(MARKER))
    return {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def manifest_problem(path: Path) -> str | None:
    """None if every file the marker lists is there with its size and checksum, else what is wrong
    (naming the file). Markers written before manifests existed list no files and are trusted."""
    try:
        files = json.loads((path / MARKER).read_text()).get("files", {})
    except (OSError, ValueError) as e:
        return f"{path / MARKER} unreadable: {e}"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its sha256 in the manifest"
    return None
