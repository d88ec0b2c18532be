"""The in-training eval (and `launcher eval --config`): the run's held-out shards, scored per task at
the original image size, teacher-forced with a sample cap by default (eval.mode, eval.max_samples);
metrics to MLflow and eval_<prefix>_step<N>.json, overlays as PNG artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launcher import dist
from launcher.config import RunConfig
from launcher.eval import masks as M
from launcher.eval.overlays import save_overlays
from launcher.eval.records import Prediction, target_from_sample
from launcher.eval.runner import (
    RunSettings,
    batches_for,
    broadcast,
    eval_batches,
    gather_pairs,
    predict_batches,
)
from launcher.eval.score import score_by_task
from launcher.tracking import Tracker


class Evaluator:
    def __init__(self, cfg: RunConfig, tokenizer, info: dist.DistInfo, run_dir: Path, tracker: Tracker, num_image_tokens: int):
        self.cfg, self.tokenizer, self.info = cfg, tokenizer, info
        self.run_dir, self.tracker = run_dir, tracker
        self.num_image_tokens = num_image_tokens
        self.frame = cfg.model.pixel_encoder.image_size
        e = cfg.eval
        self.settings = RunSettings(
            mode=e.mode, max_new_tokens=e.max_new_tokens, mask_threshold=e.mask_threshold, num_overlays=e.num_overlays,
            max_batches=batches_for(e.max_samples, e.max_batches, cfg.data.eval_batch_size, info.world_size),
        )

    def _batches(self):
        return eval_batches(self.cfg.data, self.tokenizer, num_image_tokens=self.num_image_tokens,
                            clip_size=self.cfg.model.vision.image_size, sam_size=self.frame, info=self.info,
                            max_batches=self.settings.max_batches)

    def run(self, model: torch.nn.Module, step: int, prefix: str = "val") -> dict[str, float]:
        """Predict every held-out sample up to the cap (eval.mode), score, log."""
        model.eval()
        synced = self.info.world_size > 1 and self.cfg.train.zero_stage == 3
        pairs, overlays = predict_batches(model, self._batches(), self.settings, self.info, synced, self._question)
        model.train()
        return self._report(pairs, overlays, step, prefix, self.settings.mode)

    def run_baseline(self, step: int, prefix: str = "val_textblind") -> dict[str, float]:
        """Predict the union of all objects of the image (extra["objects"]), whatever the question asks."""
        pairs = []
        for batch in self._batches():
            for key, sample in zip(batch.keys, batch.samples):
                if sample is None:
                    continue
                t = target_from_sample(key, sample)
                objects = M.decode([o["rle"] for o in sample.extra.get("objects", [])], t.image_size)
                union = M.union(objects.astype(bool), t.image_size)
                pairs.append((Prediction(key, "(text-blind: union of all objects)", M.encode(union[None]) if union.any() else []), t))
        return self._report(pairs, [], step, prefix, "generate")

    def _report(self, pairs, overlays, step: int, prefix: str, mode: str) -> dict[str, float]:
        pairs, _ = gather_pairs(pairs, self.info)
        metrics = broadcast(score_by_task(pairs, mode, prefix) if self.info.is_main else None, self.info)
        self.tracker.log_metrics(metrics, step)
        if self.info.is_main:
            out = self.run_dir / f"eval_{prefix}_step{step:08d}.json"
            out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
            self.tracker.log_artifact(out, "eval")
            if self.cfg.tracking.log_overlays and overlays:
                name = f"{prefix}_step{step:08d}"
                key = "val" if prefix == "val_untrained" else prefix  # the untrained eval is step 0 of the same slider
                save_overlays(overlays, self.run_dir / "overlays" / name, self.tracker, key, step)
            summary = " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in metrics.items() if k.endswith(("IoU", "acc", "AP50")))
            print(f"[segcap] eval {prefix} step {step} ({mode}): {summary}", flush=True)
        return metrics

    def _question(self, prompt_ids: torch.Tensor) -> str:
        """The user's words of a prompt: no system text, no image placeholders, no role tags."""
        image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        text = self.tokenizer.decode([t for t in prompt_ids.tolist() if t != image_id], skip_special_tokens=False)
        text = text.replace(" :", ":")  # word-level tokenizers decode "USER:" as "USER :"
        text = text.rsplit("USER:", 1)[-1]
        return text.split("ASSISTANT:", 1)[0].strip()
