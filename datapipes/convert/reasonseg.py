"""ReasonSeg (LISA): per-image labelme-like JSON (`text`, `is_sentence`, polygon `shapes`) beside its JPEG
-> referring samples. The mask is LISA's: polygons painted largest first, targets 1 and `ignore` labels
0 (smaller shapes paint over larger ones), rasterised with pycocotools.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from datapipes.convert.common import (
    BadRecord,
    Output,
    chunks,
    conversation,
    load_json,
    question,
    read_photo,
    rle_ann,
    rng_for,
    seg_answer,
    segm_rle,
)
from datapipes.convert.run import Converter

EXPLAIN = "Please output segmentation mask and explain why."
from datapipes.schema import Sample


class ReasonSegConverter(Converter):
    """--src ReasonSeg/ (holding train/, val/, test/); train samples carry up to 3 of an image's
    instructions, val/test only the first (as LISA evaluates)."""

    splits = ("train", "val", "test")

    def __init__(self, args):
        super().__init__(args)
        self.turns = args.turns or 3
        self.folder = self.src / self.split
        # explanatory/train.json: {image, query, outputs} for some train photos -> one more sample each
        # whose answer explains the mask (LISA mixes these in at a 10% rate; here each is written once)
        path = self.src / "explanatory" / f"{self.split}.json"
        self.explained = {Path(e["image"]).stem: e for e in load_json(path)} if path.is_file() else {}

    def units(self):
        return [(p.stem, p.name) for p in sorted(self.folder.glob("*.json"))]

    def image_path(self, payload) -> Path:
        return self.images / self.split / (Path(payload).stem + ".jpg")

    def convert(self, uid, payload, bad) -> list[Output]:
        d = _read(self.folder / payload)
        texts = d.get("text")
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise BadRecord("bad_json", f"{payload}: `text` must be a non-empty list of instructions")
        photo = read_photo(self.image_path(payload))
        h, w = photo.height, photo.width
        mask, ignore = _mask(d.get("shapes", []), h, w, payload)
        extra = {"ignore": ignore} if ignore is not None else {}
        if self.split != "train":
            texts = texts[:1]
        sentence = bool(d.get("is_sentence", False))
        rng = rng_for(self.name, self.split, uid)
        outs = []
        for k, chunk in enumerate(chunks(texts, self.turns)):
            pairs = [(question(t, rng, sentence=sentence), seg_answer(rng)) for t in chunk]
            masks = [rle_ann(mask, t.strip(), payload) for t in chunk]
            source = {"dataset": self.name, "id": uid, "split": self.split, "file_name": uid + ".jpg",
                      "is_sentence": sentence, "text_index": k * self.turns}
            outs.append(Output(Sample("referring", conversation(pairs), masks, [h, w], source, extra=dict(extra)),
                               photo.data, reencoded=photo.reencoded))
        e = self.explained.get(uid)
        if e and str(e.get("query", "")).strip() and str(e.get("outputs", "")).strip():
            pairs = [(f"{e['query'].strip()} {EXPLAIN}", f"{seg_answer(rng)} {e['outputs'].strip()}")]
            source = {"dataset": self.name, "id": uid, "split": self.split, "file_name": uid + ".jpg",
                      "is_sentence": True, "explanatory": True}
            masks = [rle_ann(mask, e["query"].strip(), payload)]
            outs.append(Output(Sample("referring", conversation(pairs), masks, [h, w], source), photo.data,
                               reencoded=photo.reencoded))
        return outs


def _read(path: Path) -> dict:
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):  # some ReasonSeg files are not UTF-8 (LISA falls back the same way)
        try:
            d = json.loads(raw.decode(encoding))
            break
        except (UnicodeDecodeError, ValueError):
            d = None
    if not isinstance(d, dict):
        raise BadRecord("bad_json", f"{path} is not a JSON object")
    return d


def _mask(shapes: list, h: int, w: int, what: str) -> tuple[dict, dict | None]:
    """Targets minus the ignore regions painted over them, as compressed RLE, and the ignore region itself
    (JSON RLE, None when there is none): evaluation leaves those pixels out, as LISA's ignore label 255 does."""
    painted = []
    for s in shapes:
        label = str(s.get("label", ""))
        if label == "flag":  # deprecated label, skipped by LISA
            continue
        pts = np.asarray(s.get("points", []), float).reshape(-1, 2) if s.get("points") else np.zeros((0, 2))
        if len(pts) < 3:
            raise BadRecord("bad_polygon", f"{what}: shape {label!r} has fewer than 3 points")
        rle = segm_rle([pts.ravel().tolist()], h, w, f"{what} shape {label!r}")
        area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
        painted.append((area, "ignore" not in label, rle))
    canvas = np.zeros((h, w), np.uint8)
    for _, target, rle in sorted(painted, key=lambda t: -t[0]):  # stable: equal areas keep file order
        canvas[mask_utils.decode(rle) > 0] = 1 if target else 2
    if not (canvas == 1).any():
        raise BadRecord("empty_mask", f"{what}: no target pixels")
    ignore = None
    if (canvas == 2).any():  # LISA scores with these pixels left out of intersection and union (label 255)
        rle = mask_utils.encode(np.asfortranarray((canvas == 2).astype(np.uint8)))
        ignore = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return mask_utils.encode(np.asfortranarray((canvas == 1).astype(np.uint8))), ignore
