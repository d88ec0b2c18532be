"""`python -m launcher infer`: an exported model answers prompts about images. Per image it writes
`<out>/<stem>.json` ({"answer", "phrases", "masks": COCO RLE at the original image size, one per [SEG]})
and `<out>/<stem>.png` (the masks over the image). Inputs are prepared exactly as the loader does."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHRASE = re.compile(r"<p>\s*(.*?)\s*</p>", re.S)
COLORS = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


@dataclass
class Request:
    image: Path
    prompt: str
    name: str  # output file stem (sanitised)


def requests_from_jsonl(path: Path) -> list[Request]:
    """One {"image": path, "prompt": str[, "name": stem]} per line; relative images are relative to the file."""
    path = Path(path)
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, prompt = Path(row["image"]), str(row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: expected {{\"image\": ..., \"prompt\": ...}} ({e})") from None
        image = image if image.is_absolute() else path.parent / image
        out.append(Request(image, prompt, safe_stem(row.get("name") or image.stem)))
    return out


def safe_stem(name: str) -> str:
    """A file stem that cannot leave the output folder: path separators, '..' and odd characters go."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).name).lstrip(".")
    return stem or "image"


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, str]:
    """auto: CUDA when present; bf16 where the GPU supports it, else float32 (CPU bf16 is slow)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dev, dtype


def prompt_ids(prompt: str, tokenizer, image_id: int, num_image_tokens: int) -> torch.Tensor:
    """The generation prefix of a one-turn conversation, tokenized as the loader does for eval."""
    from datapipes.text import tokenize_conversation

    content = prompt if "<image>" in prompt else "<image>\n" + prompt
    conv = [{"role": "user", "content": content}, {"role": "assistant", "content": "."}]
    tokens = tokenize_conversation(conv, tokenizer, image_id=image_id, num_image_tokens=num_image_tokens, max_length=10**9)
    return torch.tensor(tokens.prompt_ids)


def to_original(mask: torch.Tensor, frame_hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A (S, S) mask of the padded SAM frame -> (h, w) uint8 at the original image size (nearest)."""
    nh, nw = frame_hw
    crop = mask[:nh, :nw].to(torch.uint8).cpu().numpy()
    h, w = size
    if (nh, nw) != (h, w):
        crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.NEAREST))
    return crop


def overlay(image: Image.Image, masks: list[np.ndarray]) -> Image.Image:
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i, m in enumerate(masks):
        color = np.array(COLORS[i % len(COLORS)], dtype=np.float32)
        sel = m.astype(bool)
        out[sel] = 0.5 * out[sel] + 0.5 * color
    return Image.fromarray(out.astype(np.uint8))


class Predictor:
    """An exported model, loaded once, and the input preparation of the loader."""

    def __init__(self, model_dir: Path, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 64):
        from datapipes.text import image_token_id
        from launcher.export import load_export

        self.device, dtype = pick_device_dtype(device, dtype)
        self.model, self.tokenizer, self.meta = load_export(model_dir, dtype=dtype, device=self.device)
        self.image_id = image_token_id(self.tokenizer)
        self.max_new_tokens = max_new_tokens
        cfg = self.model.cfg
        self.clip_size, self.sam_size = cfg.vision.image_size, cfg.pixel_encoder.image_size

    @torch.no_grad()
    def __call__(self, image: Image.Image, prompt: str) -> tuple[dict, list[np.ndarray]]:
        from pycocotools import mask as mask_utils

        from datapipes.collate import clip_frame, normalize_pixels, sam_frame

        image = image.convert("RGB")
        sam, frame_hw = sam_frame(image, self.sam_size)
        pad = self.meta.get("clip_frame", "squash") == "pad"  # as the run was trained (exports before: squash)
        clip, sam = normalize_pixels(clip_frame(image, self.clip_size, pad=pad)[None].to(self.device), sam[None].to(self.device),
                                     torch.tensor([frame_hw], device=self.device))
        ids = prompt_ids(prompt, self.tokenizer, self.image_id, self.model.num_image_tokens)
        (pred,) = self.model.predict([ids], clip, sam, self.max_new_tokens)
        masks = [to_original(m, frame_hw, (image.height, image.width)) for m in pred.masks]
        rles = []
        for m in masks:
            rle = mask_utils.encode(np.asfortranarray(m))
            rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
        return {"answer": pred.text, "phrases": PHRASE.findall(pred.text), "masks": rles}, masks


def infer(model_dir: Path, requests: list[Request], out: Path, device: str = "auto", dtype: str = "auto",
          max_new_tokens: int = 64) -> list[Path]:
    """Answer every request; returns the JSON files written (one per request, stems made unique)."""
    out = Path(out)
    for r in requests:
        if not r.image.is_file():
            raise FileNotFoundError(f"image {r.image} not found")
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model_dir, device, dtype, max_new_tokens)
    written, used = [], set()
    for r in requests:
        stem, n = r.name, 1
        while stem in used:
            n += 1
            stem = f"{r.name}_{n}"
        used.add(stem)
        target = out / f"{stem}.json"
        if target.resolve().parent != out.resolve():  # safe_stem makes this impossible; keep it so
            raise ValueError(f"output name {stem!r} would leave {out}")
        with Image.open(r.image) as im:
            image = im.convert("RGB")
        result, masks = predictor(image, r.prompt)
        target.write_text(json.dumps(result, indent=1))
        overlay(image, masks).save(out / f"{stem}.png")
        written.append(target)
        print(f"{r.image} -> {target}: {result['answer']!r} ({len(masks)} mask(s))", flush=True)
    return written
