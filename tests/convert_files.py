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
