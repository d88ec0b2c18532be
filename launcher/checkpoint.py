"""Checkpoints that are complete or ignored: every rank saves its DeepSpeed shards (frozen weights
excluded) plus its RNG state (JSON), rank 0 a consolidated copy of the trainable state (`trainable/`:
fp32 weights and Adam moments by parameter name, safetensors); after a barrier rank 0 writes a COMPLETE
marker atomically. Resume only ever picks a directory with the marker, so a save cut off by preemption or
a crash is never used. The same world size resumes from the shards; another one from `trainable/`.
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
from safetensors import SafetensorError

from launcher.dist import DistInfo, barrier

MARKER = "COMPLETE"
TRAINABLE = "trainable"  # subfolder: model.safetensors, optimizer.safetensors, state.json
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state


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


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The complete checkpoint of `run_dir` at `step` (None: the latest); a clear error otherwise."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    done = complete_checkpoints(ckpt_dir)
    if not done:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    for p in reversed(done):
        if step is None or _step_of(p) == step:
            problem = manifest_problem(p)
            if problem:
                raise FileNotFoundError(f"checkpoint {p} is damaged: {problem}")
            return p
    raise FileNotFoundError(f"no complete checkpoint of step {step} under {ckpt_dir}; complete: {[_step_of(p) for p in done]}")


# --- RNG: JSON, never a pickle (a checkpoint may come from anywhere) --------------------------------

def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank:05d}.json"


# --- save -----------------------------------------------------------------------------------------

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
        _rng_file(path, info.rank).write_text(json.dumps(rng_state()))
        save_trainable(engine, path / TRAINABLE, client_state, info)
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, I/O error; torch.save reports
        free = shutil.disk_usage(ckpt_dir).free  # ENOSPC as "enforce fail ... unexpected pos": say the free space
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


# --- the consolidated trainable state: independent of the world size --------------------------------

def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # ZeRO-3 leaves p empty


def _zero_partitioned(engine) -> bool:
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps (ZeRO wraps it)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _stepped(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps: ZeRO-3's flat fp32 partitions (it empties the param
    groups between steps), ZeRO-1/2's flat partitions or the parameters (in the param groups)."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def _optimizer_step(engine) -> int:
    """AdamW's step count (the same for every state entry: every trainable parameter steps together)."""
    steps = {int(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer states disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def save_trainable(engine, folder: Path, client_state: dict, info: DistInfo) -> None:
    """Collective: gather each trainable parameter's fp32 weight and Adam moments (one all-gather each
    under ZeRO-3; ~75M parameters at 13B) and write them on rank 0, with the step counts and LR schedule."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    weights, moments = {}, {}
    partitioned = _zero_partitioned(engine)
    plain_state = _base_optimizer(engine).state
    for name, p in _trainable(engine):
        full = safe_get_full_fp32_param(p) if partitioned else p.detach()
        for key in MOMENTS:
            m = safe_get_full_optimizer_state(p, key) if partitioned else plain_state.get(p, {}).get(key)
            if m is not None and info.is_main:
                moments[f"{key}.{name}"] = m.detach().float().cpu().reshape(_shape(p)).contiguous()
        if info.is_main:
            weights[name] = full.detach().float().cpu().reshape(_shape(p)).contiguous()
    step = _optimizer_step(engine)
    if not info.is_main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    save_file(moments, str(folder / "optimizer.safetensors"))
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else {}
    state = {
        "client_state": client_state,
        "world_size": info.world_size,
        "optimizer_step": step,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": {k: sched[k] for k in ("last_epoch", "base_lrs", "_last_lr", "_step_count") if k in sched},
    }
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def trainable_weights(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 trainable weights of a checkpoint directory, by parameter name (export reads these)."""
    from safetensors.torch import load_file

    file = Path(path) / TRAINABLE / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} missing: checkpoint {path} has no consolidated trainable state")
    return load_file(str(file))


def load_trainable(engine, path: Path, load_optimizer: bool = True) -> dict:
    """Collective: set every trainable parameter (module weight and fp32 master) and, with
    `load_optimizer`, its Adam moments, the step counts and the LR schedule from `path/trainable/`.
    Works at any world size and ZeRO stage. Returns the client state."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    folder = path / TRAINABLE
    state = json.loads((folder / "state.json").read_text())
    weights = trainable_weights(path)
    moments = load_file(str(folder / "optimizer.safetensors")) if load_optimizer else {}
    named = _trainable(engine)
    missing = [n for n, _ in named if n not in weights]
    unexpected = sorted(set(weights) - {n for n, _ in named})
    if missing or unexpected:
        raise RuntimeError(f"{folder / 'model.safetensors'} does not match this model's trainable parameters: "
                           f"missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    partitioned = _zero_partitioned(engine)
    base = _base_optimizer(engine)
    if load_optimizer:
        _init_adam_state(base, _stepped(engine), state["optimizer_step"])
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 and bf16 map each parameter onto that state only after a step
            link()
    for name, p in named:
        value = weights[name]
        shape = _shape(p)
        if tuple(value.shape) != shape:
            raise RuntimeError(f"{folder / 'model.safetensors'}: {name} has shape {tuple(value.shape)}, the model {shape}")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.data.copy_(value.to(p.dtype))
        if partitioned:
            safe_set_full_fp32_param(p, value.to(p.device))
        for key in MOMENTS if load_optimizer else ():
            m = moments[f"{key}.{name}"]
            if partitioned:
                safe_set_full_optimizer_state(p, m.to(p.device), key)
            else:
                base.state.setdefault(p, {})[key] = m.to(p.device)
    if load_optimizer:
        if engine.lr_scheduler is not None and state["lr_scheduler"]:
            sched = engine.lr_scheduler
            sched.__dict__.update(state["lr_scheduler"])
            for group, lr in zip(base.param_groups, sched._last_lr):
                group["lr"] = lr
        engine.global_steps = state["global_steps"]
        engine.global_samples = state["global_samples"]
        engine.skipped_steps = state["skipped_steps"]
    return state["client_state"]


def _init_adam_state(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], step: int) -> None:
    """Give every tensor the optimizer steps the state torch's AdamW creates at its first step, with
    the saved step count: a fresh engine has none yet, and the moments are then written into it."""
    for p in tensors:
        st = optimizer.state[p]
        if "step" in st:
            st["step"] = torch.full_like(torch.as_tensor(st["step"]), float(step))
        else:
            st["step"] = torch.tensor(float(step))
        for key in MOMENTS:
            st.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))


# --- load -----------------------------------------------------------------------------------------

def load(engine, path: Path, info: DistInfo, load_optimizer: bool = True) -> dict:
    """Restore a checkpoint into `engine` and return the client state. The world size that wrote it:
    DeepSpeed's own shards (model, optimizer, schedule) and this rank's RNG. Another world size: the
    consolidated trainable state; ranks that did not exist then keep their fresh RNG."""
    marker = json.loads((path / MARKER).read_text())
    if marker["world_size"] != info.world_size:
        if info.is_main:
            print(f"[segcap] {path} was written by {marker['world_size']} ranks, this run has {info.world_size}: "
                  f"loading its consolidated trainable state", flush=True)
        client_state = load_trainable(engine, path, load_optimizer)
    else:
        _, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False, load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
        )
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rng_file = _rng_file(path, info.rank)
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    elif marker["world_size"] == info.world_size:
        raise FileNotFoundError(f"{rng_file} missing (checkpoints of older segcap versions kept a pickle; resume from a newer one)")
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
