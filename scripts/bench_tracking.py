"""Benchmark: the MLflow tracker's cost as a share of the training step, for the demo's tiny model on one
CPU process, with the store up and with it down. Prints figures; asserts nothing.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python scripts/bench_tracking.py [--tracking-uri http://host:port]

Each step logs ~35 metrics, about what the train loop logs (log_every=1, the worst case; the demo logs
every 50 steps), and every --image-every steps an overlay image (real runs: once per eval). Modes run in interleaved blocks (off, up, down, off, ...)
so that load from other processes spreads over all of them. Two figures per mode: the time the training
thread spends inside tracker calls, and the mean step time against the tracker-off blocks (which also
catches the background thread's share of the GIL and CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", help="the store when up (default: a SQLite file, the embedded default)")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per mode")
    ap.add_argument("--steps", type=int, default=15, help="steps per block")
    ap.add_argument("--image-every", type=int, default=10, help="log an overlay image every N steps (0: none)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from PIL import Image

    from datapipes.loader import build_train_loader
    from datapipes.synthetic import write_synthetic
    from launcher import dist
    from launcher.config import TrackingConfig, load_config
    from launcher.dist import free_port
    from launcher.engine import build_run, render_ds_config
    from launcher.tracking import Tracker

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    cfg = load_config("configs/train/demo.yaml", [f"data.synthetic.out_dir={tmp}/data", "data.synthetic.num_train=400",
                                                  "data.synthetic.num_val=8", f"train.output_dir={tmp}/run",
                                                  f"data.train=[{{name: synthetic, path: {tmp}/data/train}}]",
                                                  f"data.val=[{{name: synthetic_val, path: {tmp}/data/val}}]"])
    write_synthetic(cfg.data.synthetic)
    info = dist.identity()
    dist.init(info)
    tokenizer, model, engine = build_run(cfg, render_ds_config(cfg, info))
    stream = iter(build_train_loader(cfg.data, tokenizer, num_image_tokens=model.num_image_tokens,
                                     clip_size=cfg.model.vision.image_size, sam_size=cfg.model.pixel_encoder.image_size,
                                     rank=0, world_size=1, seed=0, start_step=0))
    Image.new("RGB", (256, 336), "gray").save(tmp / "overlay.png")
    uris = {"up": args.tracking_uri or f"sqlite:///{tmp}/mlflow.db", "down": f"http://127.0.0.1:{free_port()}"}
    trackers = {m: Tracker(TrackingConfig(tracking_uri=u, experiment="bench", run_name=m, max_backoff_s=5),
                           tmp / m, True) for m, u in uris.items()}
    for t in trackers.values():
        t.start(None, {f"p{i}": i for i in range(300)}, {})

    def step(n: int, tracker: Tracker | None) -> float:
        t0 = time.perf_counter()
        batch = next(stream)
        out = engine(**batch.to(info.device).model_inputs())
        engine.backward(out.loss)
        engine.step()
        if tracker is not None:
            metrics = {f"train/{k}": float(v) for k, v in out.terms.items()}
            metrics.update({"train/loss": float(out.loss), "lr": engine.get_lr()[0], "perf/samples_per_s": 1.0,
                            "perf/tokens_per_s": 1.0, "perf/step_time_s": 1.0, "perf/memory_gb": 1.0,
                            "data/skipped": 0.0, "train/grad_norm": 1.0})
            metrics.update({f"val/task{i}/cIoU": 0.5 for i in range(12)})
            tracker.log_metrics(metrics, n)
            if args.image_every and n % args.image_every == 0:
                tracker.log_image(tmp / "overlay.png", key="val/00_referring", step=n)
        return time.perf_counter() - t0

    for n in range(3):  # warm-up
        step(n, None)
    times: dict[str, list[float]] = {"off": [], "up": [], "down": []}
    n = 0
    for _ in range(args.blocks):
        for mode, bucket in times.items():
            for _ in range(args.steps):
                n += 1
                bucket.append(step(n, trackers.get(mode)))
    off = statistics.mean(times["off"])
    print(f"tiny demo model, 1 CPU process, {args.blocks} x {args.steps} steps per mode, log every step, "
          f"an image every {args.image_every or 'no'} steps:")
    print(f"  tracker off: {1e3 * off:.1f} ms/step (median {1e3 * statistics.median(times['off']):.1f})")
    for mode in ("up", "down"):
        t = trackers[mode]
        calls = t.call_s / len(times[mode])
        mean = statistics.mean(times[mode])
        print(f"  store {mode:4s} ({uris[mode]}): {1e3 * mean:.1f} ms/step (median "
              f"{1e3 * statistics.median(times[mode]):.1f}); in tracker calls {1e3 * calls:.3f} ms/step = "
              f"{100 * calls / off:.3f}% of a step; step time vs off {100 * (mean - off) / off:+.1f}%")
        if t.applier is not None:
            bg = t.applier.cpu_s / len(times[mode])
            print(f"    background thread CPU (successful applies): {1e3 * bg:.3f} ms/step = {100 * bg / off:.3f}% of a step")
    print(f"  spool left unapplied: up {trackers['up'].journal.pending()} bytes, "
          f"down {trackers['down'].journal.pending()} bytes (down: replayed later by `runs sync`)")
    for t in trackers.values():
        t.finish()
        t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
