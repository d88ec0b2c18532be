"""The training loop: one readable function from config to checkpoints.

Per step: take `grad_accum` batches from the stream, forward/backward through the DeepSpeed engine,
step; log (rank 0), evaluate, checkpoint. SIGUSR1/SIGTERM or the wall-clock budget make every rank
save a complete checkpoint and exit with EXIT_REQUEUE; rerunning with the same output_dir resumes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import torch
import yaml

from launcher import checkpoint, dist
from launcher.config import RunConfig, flatten, to_dict
from launcher.engine import build_run, render_ds_config
from launcher.stop import install as install_signal_handlers
from launcher.stop import received as received_signal
from launcher.tracking import Tracker, dataset_inputs, run_params, run_tags

EXIT_OK = 0
EXIT_REQUEUE = 3  # "checkpoint saved, run me again": slurm/*.sh requeues the job on this code


class StopRequest:
    """Remembers SIGUSR1/SIGTERM; the loop acts on it at the next step boundary, on all ranks at once."""

    def __init__(self) -> None:
        install_signal_handlers()  # again: harmless, and needed when train() is called without `python -m launcher`

    @property
    def signum(self) -> int | None:
        return received_signal()

    def wait(self, timeout_s: float) -> None:
        """Block until SIGUSR1/SIGTERM has arrived (tests hold a run at a step to preempt it there)."""
        deadline = time.monotonic() + timeout_s
        while self.signum is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{HOLD_ENV}: no SIGUSR1/SIGTERM within {timeout_s:.0f} s")
            time.sleep(0.05)


# Tests only: after logging this step, every rank waits for the preemption signal before deciding to
# stop, so that a test preempts a run at a known step whatever the machine's speed.
HOLD_ENV = "SEGCAP_TEST_HOLD_AT_STEP"
HOLD_TIMEOUT_S = 600.0


def train(cfg: RunConfig) -> int:
    from datapipes.loader import build_train_loader
    from launcher.eval.evaluator import Evaluator

    t_start = time.time()
    info = dist.identity()
    dist.init(info)
    stop = StopRequest()
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed + info.rank)

    ds_config = render_ds_config(cfg, info)
    flops = _flop_model(cfg, info)  # before build_run: with ZeRO-3 on, transformers would build it partitioned
    tokenizer, model, engine = build_run(cfg, ds_config)

    # --- resume
    start_step, run_id = 0, None
    resume_from = checkpoint.latest_complete(ckpt_dir) if cfg.train.resume else None
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, info)
        start_step, run_id = state["step"], state.get("mlflow_run_id")
        log0(info, f"resumed from {resume_from} at step {start_step}")
    tracker = Tracker(cfg.tracking, run_dir, active=info.is_main)
    params = run_params(flatten(to_dict(cfg)), ds_config, info.world_size) if info.is_main else {}
    run_id = tracker.start(run_id or _env_run_id(), params, run_tags(info.world_size))
    if info.is_main:
        _write_run_files(cfg, ds_config, run_dir, tracker, fresh=resume_from is None)
        _forget_steps_after(run_dir, start_step, tracker)

    evaluator = Evaluator(cfg, tokenizer, info, run_dir, tracker, num_image_tokens=model.num_image_tokens)
    if cfg.eval.at_start and start_step == 0:
        evaluator.run(engine.module, step=0, prefix="val_untrained")
    stream = iter(
        build_train_loader(
            cfg.data,
            tokenizer,
            num_image_tokens=model.num_image_tokens,
            clip_size=cfg.model.vision.image_size,
            sam_size=cfg.model.pixel_encoder.image_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.train.seed,
            start_step=start_step * cfg.train.grad_accum,
        )
    )

    # --- loop
    hold_at = int(os.environ.get(HOLD_ENV, "0"))
    from datapipes.loader import REASONS

    skip_keys = [f"{src.name}/{r}" for src in cfg.data.train for r in REASONS]  # the same on every rank
    skipped_total: dict[str, float] = {}
    meter = _Meter(skip_keys, flops)
    step = start_step
    engine.train()
    while step < cfg.train.steps:
        t0 = time.time()
        for _ in range(cfg.train.grad_accum):
            t = time.time()
            batch = next(stream)
            t_data = time.time()
            out = engine(**batch.to(info.device).model_inputs())
            engine.backward(out.loss)
            _sync(info)
            t_fwd_bwd = time.time()
            engine.step()
            _sync(info)
            meter.split(t_data - t, t_fwd_bwd - t_data, time.time() - t_fwd_bwd)
            meter.add(out, batch)
        step += 1
        meter.time += time.time() - t0

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics = meter.reduce(info, engine)
            lrs = engine.get_lr()
            metrics["lr"] = lrs[0]
            metrics.update({f"lr/group{i}": lr for i, lr in enumerate(lrs)} if len(lrs) > 1 else {})
            tracker.log_metrics(metrics, step)
            if info.is_main:
                _append_jsonl(run_dir / "metrics.jsonl", {"step": step, **metrics})
                print(_progress(step, cfg.train.steps, metrics, t_start), flush=True)
                if any(k.startswith("data/skipped/") for k in metrics):
                    for k, v in metrics.items():
                        if k.startswith("data/skipped/"):
                            skipped_total[k[13:]] = skipped_total.get(k[13:], 0) + v
                    log0(info, "data skipped so far (source/reason): " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(skipped_total.items())))
            meter = _Meter(skip_keys, flops)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            evaluator.run(engine.module, step=step)
            engine.train()

        if step == hold_at:
            log0(info, f"holding at step {step} until SIGUSR1/SIGTERM ({HOLD_ENV})")
            stop.wait(HOLD_TIMEOUT_S)
        over_budget = cfg.train.time_budget_s > 0 and time.time() - t_start > cfg.train.time_budget_s
        preempt = dist.all_agree(stop.signum is not None or over_budget, info.device)
        if preempt or step % cfg.train.save_every == 0 or step == cfg.train.steps:
            checkpoint.save(
                engine, ckpt_dir, step, {"step": step, "mlflow_run_id": tracker.run_id}, info, cfg.train.keep_checkpoints
            )
        if preempt and step < cfg.train.steps:
            why = (f"signal {stop.signum}" if stop.signum is not None
                   else "time budget" if over_budget else "a signal to another rank")
            log0(info, f"stopping at step {step} ({why}); checkpoint saved, exit {EXIT_REQUEUE} to requeue")
            tracker.finish("KILLED")
            dist.finish()  # leave together: a launcher may kill the others once one rank exits
            return EXIT_REQUEUE

    evaluator.run(engine.module, step=step)
    tracker.finish("FINISHED")
    dist.finish()
    return EXIT_OK


class _Meter:
    """Sums the loss terms and counts of the micro-steps since the last log."""

    def __init__(self, skip_keys: list[str], flops=None) -> None:
        self.flops = flops  # launcher.fake_model.FlopModel (rank 0), for TFLOP/s and MFU
        self.seconds = [0.0, 0.0, 0.0]  # data wait, forward + backward, optimizer step
        self.sums: dict[str, float] = {}
        self.n = 0
        self.samples = 0
        self.tokens = 0
        self.skip_keys = skip_keys  # "source/reason", the same list on every rank (they all-reduce)
        self.skipped: dict[str, int] = {}
        self.cut = 0
        self.time = 0.0

    def split(self, data: float, fwd_bwd: float, optimizer: float) -> None:
        self.seconds = [a + b for a, b in zip(self.seconds, (data, fwd_bwd, optimizer))]

    def add(self, out, batch) -> None:
        self.n += 1
        for k, v in {"loss": out.loss.detach(), **out.terms}.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.samples += int(batch.input_ids.shape[0])
        self.tokens += int(batch.attention_mask.sum())
        for k, v in batch.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        self.cut += batch.cut

    def reduce(self, info: dist.DistInfo, engine) -> dict[str, float]:
        """Mean of each term over ranks and micro-steps; throughput summed over ranks."""
        keys = sorted(self.sums)
        skips = [self.skipped.get(k, 0) for k in self.skip_keys]
        vec = torch.tensor([self.sums[k] / self.n for k in keys] + [self.samples, self.tokens, self.cut] + skips)
        mem = torch.tensor([_memory_bytes(info)], dtype=torch.float64)
        if torch.distributed.is_initialized():
            vec, mem = vec.to(info.device), mem.to(info.device)
            torch.distributed.all_reduce(vec)
            torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
        vec = vec.cpu().tolist()
        out = {f"train/{k}": vec[i] / info.world_size for i, k in enumerate(keys)}
        samples, tokens, cut = vec[len(keys) : len(keys) + 3]
        skips = dict(zip(self.skip_keys, vec[len(keys) + 3 :]))
        # This rank's split, like its step time (a rank that logs makes the others wait inside their step).
        data_s, fwd_bwd_s, opt_s = (v / max(1, self.n) for v in self.seconds)
        out["perf/data_wait_s"], out["perf/forward_backward_s"], out["perf/optimizer_step_s"] = data_s, fwd_bwd_s, opt_s
        if self.flops is not None:
            tflops = self.flops.of(samples, tokens) / max(self.time, 1e-9) / info.world_size / 1e12
            out["perf/tflops_per_gpu"] = tflops
            peak = _peak_tflops(info)
            if peak:
                out["perf/mfu"] = tflops / peak
        out["perf/samples_per_s"] = samples / max(self.time, 1e-9)
        out["perf/tokens_per_s"] = tokens / max(self.time, 1e-9)
        out["perf/step_time_s"] = self.time / max(1, self.n)
        out["perf/memory_gb"] = float(mem.item()) / 2**30
        out["data/skipped"] = sum(skips.values())
        out.update({f"data/skipped/{k}": v for k, v in skips.items() if v})  # per source and reason
        out["data/cut"] = cut  # answers cut at a phrase boundary to fit data.max_length
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            out["train/grad_norm"] = float(grad_norm)
        return out


def _flop_model(cfg: RunConfig, info: dist.DistInfo):
    """Rank 0's FLOPs per batch from the model's own forward on fake weights (launcher/fake_model.py, the
    `count` and `plan` figures); a count that fails costs the MFU metric, never the run."""
    if not info.is_main:
        return None
    from launcher.fake_model import flop_model

    try:
        return flop_model(cfg)
    except Exception as e:  # noqa: BLE001  (any failure of the fake run: logged, the run goes on)
        log0(info, f"no FLOPs count, so no MFU metric: {type(e).__name__}: {e}")
        return None


def _peak_tflops(info: dist.DistInfo) -> float | None:
    if info.backend != "nccl":
        return None  # CPU runs: TFLOP/s only
    from launcher.plan import peak_tflops

    return peak_tflops(torch.cuda.get_device_name())


def _sync(info: dist.DistInfo) -> None:
    """Wait for the GPU so the step's time split is real (kernels run asynchronously)."""
    if info.backend == "nccl":
        torch.cuda.synchronize()


def _memory_bytes(info: dist.DistInfo) -> float:
    if info.backend == "nccl":
        return float(torch.cuda.max_memory_allocated())
    return float(psutil.Process().memory_info().rss)


def _progress(step: int, total: int, m: dict[str, float], t_start: float) -> str:
    elapsed = time.time() - t_start
    terms = " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in m.items() if k.startswith("train/") and k != "train/loss")
    return (
        f"step {step}/{total}  loss {m['train/loss']:.4f}  ({terms})  lr {m['lr']:.2e}  "
        f"{m['perf/samples_per_s']:.1f} samples/s  {elapsed:.0f}s"
    )


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _forget_steps_after(run_dir: Path, start_step: int, tracker: Tracker) -> None:
    """metrics.jsonl keeps every step once: the rows a killed run logged after its last checkpoint go,
    since this run logs those steps again. MLflow keeps history, so the run gets a tag per restart
    naming the steps it replays (`replayed/restart_N`: the later value of a step is the one to read)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    rows, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last row of a process killed while it wrote
            torn += 1
    replayed = sorted({r["step"] for r in rows if r["step"] > start_step})
    if not replayed and not torn:
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))
    os.replace(tmp, path)
    if not replayed:
        return
    log_path = run_dir / "restarts.jsonl"
    n = len(log_path.read_text().splitlines()) + 1 if log_path.is_file() else 1
    record = {"restart": n, "resumed_at_step": start_step, "replayed_steps": replayed, "time": time.time()}
    _append_jsonl(log_path, record)
    tracker.set_tags({f"replayed/restart_{n}": json.dumps({k: record[k] for k in ("resumed_at_step", "replayed_steps")})})


def _write_run_files(cfg: RunConfig, ds_config: dict, run_dir: Path, tracker: Tracker, fresh: bool) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    if fresh:  # (run_dir/mlflow_run_id is written once the store has the run: launcher/spool.py)
        tracker.log_artifact(run_dir / "config.yaml", "config")
        tracker.log_artifact(run_dir / "deepspeed.json", "config")
        tracker.log_inputs(dataset_inputs(cfg.data.train, "train") + dataset_inputs(cfg.data.val, "eval"))


def _env_run_id() -> str | None:
    return os.environ.get("MLFLOW_RUN_ID") or None


def log0(info: dist.DistInfo, msg: str) -> None:
    if info.is_main:
        print(f"[segcap] {msg}", flush=True)
