"""Overlay pictures of eval predictions: the image with the prediction filled in red, the target
outlined in green, and the question/answer below (written as PNGs and logged to MLflow)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from datapipes.collate import SAM_MEAN, SAM_STD
from launcher.eval.runner import Overlay


def draw_overlay(ov: Overlay, scale: int = 4) -> Image.Image:
    h, w = ov.size
    mean, std = torch.tensor(SAM_MEAN).view(3, 1, 1), torch.tensor(SAM_STD).view(3, 1, 1)
    img = (ov.pixels * std + mean).clamp(0, 255)[:, :h, :w].permute(1, 2, 0).numpy().astype(np.float32)
    p = ov.pred[:h, :w].numpy()
    img[p] = 0.45 * img[p] + 0.55 * np.array([255, 0, 0], dtype=np.float32)
    g = ov.gt[:h, :w].numpy()
    edge = g & ~(np.roll(g, 1, 0) & np.roll(g, -1, 0) & np.roll(g, 1, 1) & np.roll(g, -1, 1))
    img[edge] = [0, 255, 0]
    pic = Image.fromarray(img.astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    canvas = Image.new("RGB", (max(w * scale, 320), h * scale + 80), "white")
    canvas.paste(pic, (0, 0))
    ImageDraw.Draw(canvas).text((2, h * scale + 2), _wrap(f"{ov.key} [{ov.task}]\n{ov.caption}", 60), fill="black")
    return canvas


def save_overlays(overlays: list[Overlay], folder: Path, tracker, key_prefix: str, step: int) -> None:
    """PNGs in `folder`, each logged as an MLflow image `<key_prefix>/<j>_<task>` at `step`: one key per
    val sample across evals, so the UI's step slider shows it improving."""
    folder.mkdir(parents=True, exist_ok=True)
    for j, ov in enumerate(overlays):
        name = f"{j:02d}_{safe_name(ov.task)}"  # the task comes from the shard
        path = folder / f"{name}.png"
        draw_overlay(ov).save(path)
        tracker.log_image(path, key=f"{key_prefix}/{name}", step=step)


def safe_name(text: str, max_len: int = 64) -> str:
    """A file name from data (a shard's task or key): letters, digits, '.', '-', '_' only, never a path
    or a dot file, so nothing read from a shard can write outside the run dir."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:max_len].lstrip(".")
    return name or "_"


def _wrap(text: str, width: int, max_lines: int = 6) -> str:
    lines = []
    for para in (text or "").split("\n"):
        lines += [para[i : i + width] for i in range(0, max(len(para), 1), width)]
    return "\n".join(lines[:max_lines])
