"""Small benchmark shard folders in the converters' format (USCDF samples, WebDataset tars, manifest):
RefCOCO-style referring, gRefCOCO-style (several targets, no target), GCG-style grounded captions,
on images of odd sizes, with their exact masks so that perfect predictions can be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datapipes.schema import Sample, group_ann, mask_ann
from datapipes.shards import write_shards

SIZES = [(37, 53), (45, 31), (29, 61), (50, 50), (33, 47), (41, 39)]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220)}


def _objects(rng: np.random.Generator, h: int, w: int, n: int) -> list[tuple[str, np.ndarray]]:
    """n axis-aligned rectangles of different colours, each at least 6 x 6 pixels."""
    out = []
    for name in list(COLOURS)[:n]:
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = int(rng.integers(y0 + 6, min(h, y0 + 20) + 1)), int(rng.integers(x0 + 6, min(w, x0 + 20) + 1))
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 1
        out.append((name, m))
    return out


def _image(h: int, w: int, objects) -> np.ndarray:
    img = np.full((h, w, 3), 128, np.uint8)
    for name, m in objects:
        img[m.astype(bool)] = COLOURS[name]
    return img


def _user(text: str) -> dict:
    return {"role": "user", "content": f"<image>\n{text}"}


def refcoco(i: int, rng) -> tuple[np.ndarray, Sample]:
    h, w = SIZES[i % len(SIZES)]
    objs = _objects(rng, h, w, 2)
    name, m = objs[i % 2]
    conv = [_user(f"What is the {name} box in this image? Please output segmentation mask."),
            {"role": "assistant", "content": "[SEG]."}]
    source = {"dataset": "refcoco", "id": f"ref{i}_sent0", "ref_id": i, "ann_id": 100 + i, "sent_ids": [3 * i], "image_id": 1000 + i}
    return _image(h, w, objs), Sample("referring", conv, [mask_ann(m, f"the {name} box")], [h, w], source)


def grefcoco(i: int, rng) -> tuple[np.ndarray, Sample]:
    h, w = SIZES[i % len(SIZES)]
    objs = _objects(rng, h, w, 3)
    source = {"dataset": "grefcoco", "id": f"gref{i}", "ref_id": i, "ann_id": [], "sent_ids": [i], "image_id": 2000 + i}
    kind = i % 3
    if kind == 0:  # no target
        conv = [_user("Please segment the yellow box."), {"role": "assistant", "content": "Sorry, there is no yellow box."}]
        return _image(h, w, objs), Sample("empty_referring", conv, [], [h, w], source)
    if kind == 1:  # one target
        conv = [_user("Please segment the red box."), {"role": "assistant", "content": "[SEG]."}]
        return _image(h, w, objs), Sample("referring", conv, [mask_ann(objs[0][1], "the red box")], [h, w], source)
    conv = [_user("Please segment the green and blue boxes."), {"role": "assistant", "content": "[SEG]."}]
    ann = group_ann([objs[1][1], objs[2][1]], "the green and blue boxes")
    return _image(h, w, objs), Sample("group_referring", conv, [ann], [h, w], source)


def gcg(i: int, rng) -> tuple[np.ndarray, Sample]:
    h, w = SIZES[i % len(SIZES)]
    objs = _objects(rng, h, w, 2)
    (a, ma), (b, mb) = objs
    answer = f"A <p> {a} box </p> [SEG] beside a <p> {b} box </p> [SEG] on grey."
    conv = [_user("Could you please give me a detailed description of the image?"), {"role": "assistant", "content": answer}]
    source = {"dataset": "gcg", "id": f"img{i}", "image_id": 3000 + i}
    return _image(h, w, objs), Sample("finegrained_segcap", conv, [mask_ann(ma, f"{a} box"), mask_ann(mb, f"{b} box")], [h, w], source)


MAKERS = {"refcoco": refcoco, "grefcoco": grefcoco, "gcg": gcg}


def write_bench(out_dir: Path, name: str, n: int, seed: int = 0, maxcount: int = 4) -> list[tuple[str, Sample]]:
    rng = np.random.default_rng(seed)
    items = [(f"{name.replace('+', 'p')}_{i:04d}", *MAKERS[name](i, rng)) for i in range(n)]
    write_shards(items, out_dir, maxcount=maxcount)
    return [(key, sample) for key, _, sample in items]
