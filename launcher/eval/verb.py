"""`python -m launcher eval`: score a run's latest checkpoint on its own val shards (--config), on public
benchmarks (--run RUN_DIR --bench ...), or a predictions JSONL with no model (--predictions FILE).
One JSON report, one MLflow table per benchmark, the headline numbers printed as the seeds' tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from launcher.config import RunConfig, load_config
from launcher.eval import benchmarks as B
from launcher.eval.benchmarks import MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a train config: score its latest checkpoint on its data.val (the in-training eval)")
    p.add_argument("--run", help="a run directory (config.yaml + checkpoints/): score its latest checkpoint on --bench")
    p.add_argument("--model", help="an export folder (launcher export): score it on --bench, no DeepSpeed")
    p.add_argument("--predictions", help="a predictions JSONL to score against --bench, no model")
    p.add_argument("--bench", help=f"benchmark name(s), comma separated: {', '.join(B.BENCHMARKS)}")
    p.add_argument("--split", help="split name(s), comma separated (default: the benchmark's first)")
    p.add_argument("--data", help="the shard folder (default $SEGCAP_DATA_ROOT/shards/<bench>_<split>)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="default: teacher_forced for referring benchmarks, generate for grefcoco and captions")
    p.add_argument("--max-samples", type=int, default=0, help="score at most this many samples per split (0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="--model: samples per forward per rank")
    p.add_argument("--max-length", type=int, default=2048, help="--model: tokens per sample, image tokens included")
    p.add_argument("--max-new-tokens", type=int, default=64, help="--model: generate mode's answer length")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--save-predictions", help="a folder: write <bench>_<split>.jsonl predictions there")
    p.add_argument("overrides", nargs="*", help="config overrides (with --config or --run)")


def main(args: argparse.Namespace, checked=lambda cfg: cfg) -> int:
    """`checked(cfg)` raises a ConfigError when a model file the config names is missing."""
    chosen = [a for a in ("config", "run", "model", "predictions") if getattr(args, a)]
    if len(chosen) != 1:
        raise SystemExit("eval: give exactly one of --config, --run, --model, --predictions")
    if args.config:
        return evaluate_checkpoint(checked(load_config(args.config, args.overrides)))
    if not args.bench:
        raise SystemExit(f"eval --{chosen[0]} needs --bench NAME[,NAME...]")
    benches = B.parse(args.bench)
    if args.predictions:
        if len(benches) != 1 or (args.split and "," in args.split):
            raise SystemExit("eval --predictions scores one benchmark split at a time")
        return score_predictions(args.predictions, benches[0], B.splits_of(benches[0], args.split)[0], args)
    if args.data and (len(benches) > 1 or (args.split and "," in args.split)):
        raise SystemExit("eval --data names one shard folder: give one --bench and one --split with it")
    if args.model:
        return evaluate_export(Path(args.model), benches, args)
    run_dir = Path(args.run)
    cfg = checked(load_config(run_dir / "config.yaml", [f"train.output_dir={run_dir}", *args.overrides]))
    return evaluate_run(cfg, run_dir, benches, args)


def score_predictions(path: str, bench: B.Benchmark, split: str, args) -> int:
    from launcher.eval.records import read_predictions, read_targets
    from launcher.eval.score import pair

    mode = args.mode or bench.default_mode
    targets = {t.key: t for t in read_targets(B.shard_dir(bench, split, args.data))}
    pairs = pair(read_predictions(path), targets)
    metrics = {**B.score(bench, pairs, mode), "mode": mode, "expected": len(targets)}
    report = {bench.name: {split: metrics}}
    _finish(report, args.report)
    return 0


def evaluate_run(cfg: RunConfig, run_dir: Path, benches: list[B.Benchmark], args) -> int:
    """A run's latest checkpoint under its own DeepSpeed config; logged into the run's MLflow run."""
    from launcher import checkpoint, dist
    from launcher.engine import build_run, render_ds_config
    from launcher.tracking import run_tags

    info = dist.identity()
    dist.init(info)
    ckpt = checkpoint.latest_complete(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    tokenizer, model, engine = build_run(cfg, render_ds_config(cfg, info))
    step = checkpoint.load(engine, ckpt, info)["step"]
    tracker = _tracker(cfg, run_dir, info, {**run_tags(info.world_size), "kind": "benchmark_eval", "checkpoint": str(ckpt)})
    synced = info.world_size > 1 and cfg.train.zero_stage == 3
    _run_benches(engine.module, tokenizer, cfg.data, cfg.eval, benches, args, info, synced, tracker, step)
    return 0


def evaluate_export(folder: Path, benches: list[B.Benchmark], args) -> int:
    """An export folder (launcher/export.py): a whole model on every rank, no DeepSpeed; metrics to
    MLflow only when MLFLOW_TRACKING_URI is set."""
    import os

    from datapipes.config import DataConfig
    from launcher import dist
    from launcher.config import EvalConfig, TrackingConfig
    from launcher.export import load_export
    from launcher.tracking import Tracker, run_tags

    info = dist.identity()
    if info.world_size > 1:
        dist.init(info)
    model, tokenizer, _ = load_export(folder, device=info.device)
    data = DataConfig(eval_batch_size=args.batch_size, max_length=args.max_length)
    # the tracker's journal goes beside the report (or in the working directory), never into the export
    journal_dir = Path(args.report).resolve().parent / "eval_mlflow" if args.report else Path("eval_mlflow")
    tracker = Tracker(TrackingConfig(enabled=bool(os.environ.get("MLFLOW_TRACKING_URI")), experiment="segcap-eval"),
                      journal_dir, active=info.is_main)
    tracker.start(None, {"model": str(folder)}, {**run_tags(info.world_size), "kind": "benchmark_eval"})
    _run_benches(model, tokenizer, data, EvalConfig(max_new_tokens=args.max_new_tokens), benches, args, info, False, tracker, 0)
    return 0


def _run_benches(model, tokenizer, data_cfg, eval_cfg, benches, args, info, synced: bool, tracker, step: int) -> None:
    """Every rank predicts its share of each benchmark split; rank 0 scores, reports and logs; every rank
    ends with the same report."""
    from launcher import dist
    from launcher.eval.records import write_predictions
    from launcher.eval.runner import RunSettings, batches_for, broadcast, eval_batches, gather_pairs, predict_batches, with_val

    report: dict = {}
    model.eval()
    for bench in benches:
        mode = args.mode or bench.default_mode
        for split in B.splits_of(bench, args.split):
            folder = B.shard_dir(bench, split, args.data)
            settings = RunSettings(mode, eval_cfg.max_new_tokens, eval_cfg.mask_threshold, num_overlays=0,
                                   max_batches=batches_for(args.max_samples, 0, data_cfg.eval_batch_size, info.world_size))
            batches = eval_batches(with_val(data_cfg, f"{bench.name}_{split}", folder), tokenizer,
                                   num_image_tokens=model.num_image_tokens, clip_size=model.cfg.vision.image_size,
                                   sam_size=model.mask_size, info=info, max_batches=settings.max_batches)
            t0 = time.time()
            local, _ = predict_batches(model, batches, settings, info, synced)
            seconds = time.time() - t0
            pairs, per_rank = gather_pairs(local, info)
            metrics = None
            if info.is_main:
                keys = [p.key for p, _ in pairs]
                if len(set(keys)) != len(keys):
                    raise RuntimeError(f"{bench.name} {split}: {len(keys) - len(set(keys))} sample(s) scored twice")
                metrics = {**B.score(bench, pairs, mode), "mode": mode, "samples_per_rank": per_rank,
                           "expected": _manifest_total(folder), "seconds": seconds, "samples_per_s": len(pairs) / max(seconds, 1e-9)}
                if len(pairs) < metrics["expected"] and not settings.max_batches:
                    print(f"[segcap] eval {bench.name} {split}: {metrics['expected'] - len(pairs)} of {metrics['expected']} "
                          f"samples were not scored (skipped by the loader as bad or too long for data.max_length)", flush=True)
                if args.save_predictions:
                    write_predictions(Path(args.save_predictions) / f"{bench.name}_{split}.jsonl", [p for p, _ in pairs])
            report.setdefault(bench.name, {})[split] = broadcast(metrics, info)
            print(f"[segcap] eval rank {info.rank}: {bench.name} {split}: {len(local)} samples in {seconds:.1f} s", flush=True)
        if info.is_main:
            _log_bench(tracker, bench.name, report[bench.name], step)
    if info.is_main:
        _finish(report, args.report)
    digest = hashlib.sha1(json.dumps(report, sort_keys=True).encode()).hexdigest()
    print(f"[segcap] eval rank {info.rank}: report sha1 {digest}", flush=True)  # equal on every rank
    tracker.finish()  # FINISHED if this verb started the run; an attached run is only flushed
    dist.finish()


def _manifest_total(folder: Path) -> int:
    from datapipes.shards import read_manifest

    return int(read_manifest(folder)["total"])


def _tracker(cfg: RunConfig, run_dir: Path, info, tags: dict):
    """The run's own MLflow run when its id is known, else a new run tagged as an eval."""
    from launcher.tracking import Tracker

    tracker = Tracker(cfg.tracking, run_dir, active=info.is_main)
    run_id_file = run_dir / "mlflow_run_id"
    if tracker.active and (run_id_file.exists() or tracker.has_run):  # the run dir's own run
        tracker.attach(run_id_file.read_text().strip() if run_id_file.exists() else None)
    else:
        tracker.start(None, {}, tags)
    return tracker


def mlflow_names(name: str, splits: dict) -> dict[str, float]:
    """bench/<name>_<split>/<metric> for every number; MLflow names allow no '+' (refcoco+ -> refcocoplus)."""
    name = name.replace("+", "plus")
    return {f"bench/{name}_{s}/{k}": v for s, m in splits.items() for k, v in m.items() if isinstance(v, (int, float))}


def _log_bench(tracker, name: str, splits: dict, step: int) -> None:
    """One metric per number and one MLflow table for the benchmark."""
    numeric = {s: {k: v for k, v in m.items() if isinstance(v, (int, float))} for s, m in splits.items()}
    tracker.log_metrics(mlflow_names(name, splits), step)
    cols = sorted({k for m in numeric.values() for k in m})
    table = {"split": list(numeric), **{c: [numeric[s].get(c) for s in numeric] for c in cols}}
    tracker.log_table(table, f"eval/{name.replace('+', 'plus')}.json")


def _finish(report: dict, path: str | None) -> None:
    print(B.table(report), flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, sort_keys=True))


def evaluate_checkpoint(cfg: RunConfig) -> int:
    """`launcher eval --config`: the latest complete checkpoint of train.output_dir on the val sources,
    logged into that run's MLflow run at the checkpoint's step (as the in-training eval)."""
    from launcher import checkpoint, dist
    from launcher.engine import build_run, render_ds_config
    from launcher.eval.evaluator import Evaluator
    from launcher.tracking import Tracker, run_tags

    info = dist.identity()
    dist.init(info)
    run_dir = Path(cfg.train.output_dir)
    ckpt = checkpoint.latest_complete(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    tokenizer, model, engine = build_run(cfg, render_ds_config(cfg, info))
    state = checkpoint.load(engine, ckpt, info)
    tracker = Tracker(cfg.tracking, run_dir, active=info.is_main)
    if tracker.active and (state.get("mlflow_run_id") or tracker.has_run):  # the run dir's own run
        tracker.attach(state.get("mlflow_run_id"))
    else:
        tracker.start(None, {}, {**run_tags(info.world_size), "kind": "eval", "checkpoint": str(ckpt)})
    evaluator = Evaluator(cfg, tokenizer, info, run_dir, tracker, num_image_tokens=model.num_image_tokens)
    evaluator.run(engine.module, step=state["step"], prefix="eval")
    tracker.finish()  # FINISHED if this verb started the run; an attached run is only flushed
    dist.finish()
    return 0
