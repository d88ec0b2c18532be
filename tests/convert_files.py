"""Tiny datasets in the public on-disk formats (docs in ../shared/FORMATS.md) for the converter tests:
real JPEGs written by PIL, COCO instances.json with polygons and RLE, refer refs pickled with pickle.dump."""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def write_jpeg(path: Path, h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def polygon(rng: random.Random, h: int, w: int) -> list[float]:
    """A random convex-ish quad inside the photo, flattened [x1, y1, ...]."""
    cx, cy = rng.uniform(w * 0.3, w * 0.7), rng.uniform(h * 0.3, h * 0.7)
    rx, ry = rng.uniform(4, w * 0.3), rng.uniform(4, h * 0.3)
    return [round(v, 2) for v in (cx - rx, cy, cx, cy - ry, cx + rx, cy, cx, cy + ry)]


def decode_segm(segm, h: int, w: int) -> np.ndarray:
    """pycocotools' decoding, as the peers do it: pieces decoded and summed, then > 0."""
    if isinstance(segm, list):
        m = mask_utils.decode(mask_utils.frPyObjects(segm, h, w))
        return (m.sum(axis=2) > 0).astype(np.uint8)
    if isinstance(segm["counts"], list):
        segm = mask_utils.frPyObjects(segm, h, w)
    elif isinstance(segm["counts"], str):
        segm = {"size": segm["size"], "counts": segm["counts"].encode()}
    return mask_utils.decode(segm)


def write_coco_refer(root: Path, n_images: int = 6, seed: int = 0, grefs: bool = False) -> dict:
    """images/COCO_train2014_*.jpg + refcoco/{instances.json, refs(unc).p} (or grefcoco/grefs(unc).json).
    Every image gets 3 objects (the third as RLE) and refs in each split."""
    rng = random.Random(seed)
    images, anns, refs = [], [], []
    splits = ["train", "val", "testA", "testB"]
    ann_id, ref_id, sent_id = 100, 0, 1000
    for i in range(n_images):
        image_id = 1000 + i
        h, w = rng.randint(30, 48), rng.randint(30, 60)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        write_jpeg(root / "images" / name, h, w, seed * 100 + i)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        ids = []
        for k in range(3):
            if k == 2:  # a compressed RLE annotation
                m = np.zeros((h, w), np.uint8)
                m[2 : h // 2, 3 : w // 2] = 1
                r = mask_utils.encode(np.asfortranarray(m))
                segm = {"size": [h, w], "counts": r["counts"].decode()}
            else:
                segm = [polygon(rng, h, w)] + ([polygon(rng, h, w)] if k == 1 else [])
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1 + k, "segmentation": segm,
                         "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1]})
            ids.append(ann_id)
            ann_id += 1
        split = splits[i % 4] if i >= 2 else "train"
        targets = [[ids[0]], [ids[1]], [ids[0], ids[2]], [-1]] if grefs else [ids[0], ids[1], ids[2]]
        for t, target in enumerate(targets):
            sents = [{"sent_id": sent_id + s, "sent": f"object {t} words {s}", "raw": f"Object {t} words {s}.",
                      "tokens": ["object", str(t)]} for s in range(2 if t else 3)]
            refs.append({"ref_id": ref_id, "ann_id": target, "image_id": image_id, "split": split,
                         "category_id": 1, "file_name": name.replace(".jpg", f"_{ref_id}.jpg"),
                         "sent_ids": [s["sent_id"] for s in sents], "sentences": sents})
            ref_id += 1
            sent_id += 10
    folder = root / ("grefcoco" if grefs else "refcoco")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}))
    if grefs:
        (folder / "grefs(unc).json").write_text(json.dumps(refs))
    else:
        with open(folder / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    return {"images": {im["id"]: im for im in images}, "anns": {a["id"]: a for a in anns}, "refs": refs,
            "src": folder, "image_dir": root / "images"}


def write_reasonseg(root: Path, split: str = "train", n: int = 3, seed: int = 0) -> Path:
    """ReasonSeg/<split>/<name>.jpg + <name>.json with a target, an ignore region inside it, and text."""
    rng = random.Random(seed)
    folder = root / "ReasonSeg" / split
    for i in range(n):
        h, w = rng.randint(30, 50), rng.randint(30, 50)
        write_jpeg(folder / f"img{i}.jpg", h, w, seed + i)
        target = [[2, 2], [w - 3, 3], [w - 4, h - 3], [3, h - 4]]
        hole = [[w / 2 - 4, h / 2 - 4], [w / 2 + 4, h / 2 - 4], [w / 2 + 4, h / 2 + 4], [w / 2 - 4, h / 2 + 4]]
        small = [[w / 2 - 2, h / 2 - 2], [w / 2 + 2, h / 2 - 2], [w / 2, h / 2 + 2]]  # a target inside the hole
        d = {"text": [f"what would you sit on {i}?", "the thing for sitting", "a third way to ask", "fourth"][: 1 + i],
             "is_sentence": i % 2 == 0,
             "shapes": [{"label": "target", "points": target}, {"label": "ignore", "points": hole},
                        {"label": "target", "points": small}, {"label": "flag", "points": [[0, 0], [1, 0], [1, 1]]}]}
        (folder / f"img{i}.json").write_text(json.dumps(d))
    return root / "ReasonSeg"


def rle_str(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def blocks(h: int, w: int, values: list[int], background: int) -> np.ndarray:
    """A label map: vertical bands of `values` over the right half, `background` on the left."""
    label = np.full((h, w), background, np.uint8)
    for i, v in enumerate(values):
        label[:, w // 2 + i * (w // 2) // len(values) : w // 2 + (i + 1) * (w // 2) // len(values)] = v
    return label


def write_label_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label)
    if palette:  # Mapillary's PNGs are palette images whose index is the class
        im = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        im.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def write_coco_parts(root: Path, names: list[str], file_prefix: str, n: int = 3, seed: int = 0) -> dict:
    """A COCO-style part file (PACO-LVIS / PASCAL-Part): RLE and polygon annotations, two of one category."""
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(n):
        h, w = rng.randint(30, 44), rng.randint(30, 44)
        name = f"{file_prefix}{i:06d}.jpg"
        images.append({"id": 10 + i, "file_name": name, "height": h, "width": w})
        write_jpeg(root / "photos" / name, h, w, seed + i)
        for k, cat in enumerate([1, 2, 2, 3]):
            if k % 2:
                segm = [polygon(rng, h, w)]
            else:
                m = np.zeros((h, w), np.uint8)
                m[k * 3 : k * 3 + 8, k * 4 : k * 4 + 9] = 1
                segm = rle_str(m)
            anns.append({"id": len(anns), "image_id": 10 + i, "category_id": cat, "segmentation": segm,
                         "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c + 1, "name": nm} for c, nm in enumerate(names)]}
    return data


def write_panoptic(root: Path, n: int = 2, seed: int = 0) -> dict:
    """annotations/panoptic_train2017.json + annotations/panoptic_train2017/*.png (ids as R + 256 G + 256^2 B)
    and coco/train2017/*.jpg."""
    rng = random.Random(seed)
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "car", "isthing": 1},
            {"id": 187, "name": "wall-other-merged", "isthing": 0}, {"id": 184, "name": "tree-merged", "isthing": 0}]
    images, anns, segs_of = [], [], {}
    for i in range(n):
        h, w = rng.randint(32, 48), rng.randint(32, 48)
        name = f"{i:012d}"
        write_jpeg(root / "coco" / "train2017" / f"{name}.jpg", h, w, seed + i)
        ids = np.zeros((h, w), np.int64)
        ids[: h // 2, :] = 300 + 65536 * 2  # wall: an id that needs the blue channel
        ids[h // 2 :, : w // 3] = 5001  # tree
        ids[h // 2 :, w // 3 : w // 2] = 7
        ids[h // 2 :, w // 2 + 2 :] = 8  # two persons: merged into one node
        ids[h - 3 :, w // 2 : w // 2 + 2] = 9  # car
        info = [{"id": 300 + 65536 * 2, "category_id": 187}, {"id": 5001, "category_id": 184},
                {"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}, {"id": 9, "category_id": 7}]
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        (root / "annotations" / "panoptic_train2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "annotations" / "panoptic_train2017" / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
        anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": info})
        segs_of[i] = (ids, info)
    (root / "annotations" / "panoptic_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return segs_of


def write_llava(root: Path) -> list[dict]:
    """LLaVA records (pretrain and instruct share the schema) with photos under images/."""
    records = []
    for i in range(4):
        rel = f"{i // 2:05d}/{i:09d}.jpg"
        write_jpeg(root / "images" / rel, 24 + i, 30, i)
        records.append({"id": f"{i:09d}", "image": rel, "conversations": [
            {"from": "human", "value": "What is this?\n<image>" if i % 2 else f"<image>\nDescribe {i}."},
            {"from": "gpt", "value": f"A picture number {i}."},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing else."}][: 2 + 2 * (i % 2)]})
    png = root / "images" / "00009" / "png_photo.png"  # a photo that is not a JPEG
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 22, 3), 120, np.uint8)).save(png)
    records.append({"id": "png", "image": "00009/png_photo.png",
                    "conversations": [{"from": "gpt", "value": "dropped"}, {"from": "human", "value": "<image>\nQ?"},
                                      {"from": "gpt", "value": "A."}]})
    records.append({"id": "textonly", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    return records
