"""Eval throughput: samples/s of teacher-forced vs generate prediction on the tiny model (one CPU
process, synthetic val shards), and the projected cost of one in-training eval of the 13B model on
8 GPUs from its forward FLOPs (`launcher count`). Prints figures; asserts nothing.

    OMP_NUM_THREADS=2 python scripts/bench_eval.py [--samples 64] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    import torch

    from datapipes.config import SourceConfig
    from datapipes.synthetic import write_synthetic
    from launcher.config import load_config
    from launcher.count import count
    from launcher.dist import identity
    from launcher.eval.runner import RunSettings, eval_batches, predict_batches
    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config("configs/train/tiny.yaml", [f"data.synthetic.out_dir={tmp}", f"data.synthetic.num_val={args.samples}",
                                                   "data.synthetic.num_train=1", f"data.eval_batch_size={args.batch}"])
    write_synthetic(cfg.data.synthetic)
    cfg.data.val = [SourceConfig(name="val", path=str(tmp / "val"))]
    tokenizer = make_tokenizer(cfg.model.llm)
    model = build_model(cfg.model, tokenizer).eval()
    info = identity({})
    print(f"tiny model, {args.samples} synthetic val samples, batch {args.batch}, 1 CPU process, "
          f"torch threads {torch.get_num_threads()}")
    rates = {}
    for mode in ("teacher_forced", "generate"):
        settings = RunSettings(mode, args.max_new_tokens, 0.0, max_batches=0, num_overlays=0)
        batches = list(eval_batches(cfg.data, tokenizer, num_image_tokens=model.num_image_tokens,
                                    clip_size=cfg.model.vision.image_size, sam_size=cfg.model.pixel_encoder.image_size,
                                    info=info, max_batches=0))  # decoded up front: time the model alone
        t0 = time.perf_counter()
        pairs, _ = predict_batches(model, batches, settings, info, synced=False)
        dt = time.perf_counter() - t0
        rates[mode] = len(pairs) / dt
        print(f"  {mode:<15} {len(pairs)} samples in {dt:6.2f} s = {rates[mode]:7.2f} samples/s")
    print(f"  generate / teacher_forced time ratio: {rates['teacher_forced'] / rates['generate']:.1f}x "
          f"(random weights: generation runs to max_new_tokens={args.max_new_tokens})")

    report = count(load_config("configs/train/stage2.yaml"))
    tflop = float(re.search(r"^total\s.*?([\d.]+)\s*$", report, re.M).group(1)) / 1e3
    cap = load_config("configs/train/stage2.yaml").eval.max_samples
    peak, mfu, gpus = 989e12, 0.35, 8  # H100 bf16 dense peak; an assumed 35% of it in eval forwards
    compute_s = cap * tflop * 1e12 / (gpus * peak * mfu)
    params_gb, gather_gbps, per_rank_batches = 14.0 * 2, 150.0, max(1, cap // (gpus * 16))
    gather_s = per_rank_batches * params_gb / gather_gbps  # ZeRO-3 gathers every weight once per forward
    print(f"13B projection (launcher count: {tflop:.1f} TFLOP forward per sample): teacher-forced eval of "
          f"eval.max_samples={cap} on {gpus} GPUs ~ {compute_s:.1f} s compute + {gather_s:.1f} s ZeRO-3 weight "
          f"gathers ({per_rank_batches} forwards/rank x {params_gb:.0f} GB at {gather_gbps:.0f} GB/s) = "
          f"{compute_s + gather_s:.0f} s; generate adds a gather per new token: "
          f"~{per_rank_batches * args.max_new_tokens * params_gb / gather_gbps:.0f} s more for {args.max_new_tokens} tokens")


if __name__ == "__main__":
    main()
