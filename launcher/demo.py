"""The embedded default: synthetic shards -> tiny model trained with ZeRO-3 on 2 CPU ranks -> eval
against the untrained model and a text-blind baseline -> overlays and a local MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.config import load_config
from launcher.tracking import default_tracking_uri

HEADLINE = ("referring", "all")


def demo(config: str, overrides: list[str], nproc: int = 2) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if not any(o.startswith("train.output_dir=") for o in overrides):
        overrides = [*overrides, f"train.output_dir=runs/demo-{stamp}"]
    cfg = load_config(config, overrides)  # validate before anything starts
    run_dir = Path(cfg.train.output_dir)

    from datapipes.synthetic import write_synthetic

    t0 = time.time()
    write_synthetic(cfg.data.synthetic)
    print(f"[demo] synthetic shards in {cfg.data.synthetic.out_dir} ({time.time() - t0:.0f}s)", flush=True)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "launcher", "train", "--config", config, *overrides]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    print("[demo] " + " ".join(cmd), flush=True)
    t1 = time.time()
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"[demo] training failed with exit code {rc}", file=sys.stderr)
        return rc
    train_s = time.time() - t1

    baseline = _text_blind_baseline(cfg, run_dir)
    results = _collect(run_dir, baseline)
    results["train_seconds"] = round(train_s, 1)
    (run_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    _log_table(cfg, run_dir, results)
    print(_table(results))
    uri = cfg.tracking.tracking_uri or default_tracking_uri(run_dir)
    print(f"\nOverlays: {run_dir / 'overlays'}\nCheckpoints: {run_dir / 'checkpoints'}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    return 0


def _text_blind_baseline(cfg, run_dir: Path) -> dict[str, float]:
    """Scored in this process, logged into the demo's MLflow run."""
    from launcher.dist import identity
    from launcher.eval.evaluator import Evaluator
    from launcher.tokenizer import make_tokenizer
    from launcher.tracking import Tracker

    tracker = Tracker(cfg.tracking, run_dir, active=True)
    run_id_file = run_dir / "mlflow_run_id"
    if tracker.active and run_id_file.exists():
        tracker.attach(run_id_file.read_text().strip())
    else:
        tracker.active = False
    info = identity({})
    num_image_tokens = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    tokenizer = make_tokenizer(cfg.model.llm)  # with the special tokens the loader needs
    ev = Evaluator(cfg, tokenizer, info, run_dir, tracker, num_image_tokens=num_image_tokens)
    metrics = ev.run_baseline(step=cfg.train.steps)
    tracker.flush()
    return metrics


def _log_table(cfg, run_dir: Path, results: dict) -> None:
    """The results table as an MLflow table of the demo's run (one row per model)."""
    from launcher.tracking import Tracker

    tracker = Tracker(cfg.tracking, run_dir, active=(run_dir / "mlflow" / "attempt.json").exists())
    models = results["models"]
    cols = sorted({c for m in models.values() for c in m})
    table = {"model": list(models), **{c: [models[m].get(c) for m in models] for c in cols}}
    tracker.attach()
    tracker.log_table(table, "demo_results.json")
    tracker.flush()


def _collect(run_dir: Path, baseline: dict[str, float]) -> dict:
    rows = {"text-blind baseline": baseline}
    for f in sorted(run_dir.glob("eval_*_step*.json")):
        prefix = f.stem.split("_step")[0][len("eval_") :]
        name = {"val": "trained", "val_untrained": "untrained"}.get(prefix)
        if name:
            rows[name] = json.loads(f.read_text())  # the last file of a prefix is its final eval
    table = {}
    for name, metrics in rows.items():
        table[name] = {
            f"{task}/{m}": v
            for k, v in metrics.items()
            for task in HEADLINE
            for m in ("cIoU", "gIoU")
            if k.endswith(f"/{task}/{m}")
        }
        for k, v in metrics.items():
            if k.endswith("N-acc") and "/all/" not in k:
                table[name][k.split("/", 1)[1]] = v
    return {"models": table}


def _table(results: dict) -> str:
    models = results["models"]
    cols = sorted({c for m in models.values() for c in m})
    lines = ["", "model".ljust(22) + "".join(c.rjust(30) for c in cols)]
    for name in ("trained", "untrained", "text-blind baseline"):
        if name in models:
            lines.append(name.ljust(22) + "".join(f"{models[name].get(c, float('nan')):30.3f}" for c in cols))
    return "\n".join(lines)
