"""What every converter shares: bad-record and error types, photos kept as their original JPEG bytes,
COCO polygons/RLE -> compressed RLE at the photo's size, and LISA-style question/answer turns.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from datapipes.schema import IMAGE_TOKEN, SEG_TOKEN, MaskAnn, Sample, _rle_pixels

JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG; its bytes decode as the first picture
POLYGON_TOLERANCE = 1.0  # pixels a polygon vertex may lie outside the photo (COCO has x == width + 0.5)


class ConvertError(RuntimeError):
    """The conversion cannot run (missing annotation file, bad arguments): stops with this message."""


class BadRecord(Exception):
    """One record cannot be converted; the run skips it and counts it under `reason`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Output:
    sample: Sample
    image: bytes
    ext: str = "jpg"
    reencoded: bool = False


@dataclass
class Photo:
    data: bytes  # what goes into the shard: the file's own bytes when it is a JPEG
    height: int
    width: int
    reencoded: bool = False  # not a JPEG on disk: decoded and written as JPEG


def sample_key(dataset: str, split: str, uid: str, j: int) -> str:
    """The tar key: WebDataset splits member names at the first dot, so only [A-Za-z0-9_-] stay."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{dataset}-{split}-{uid}-{j}".replace("+", "plus"))


def read_photo(path: str | Path) -> Photo:
    """A photo's bytes and size. JPEGs are kept byte for byte (decoded at 1/8 scale only to prove they
    decode); anything else is decoded and stored as a quality-95 JPEG."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadRecord("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise BadRecord("missing_image", f"{path} cannot be read: {e}") from e
    try:
        im = Image.open(io.BytesIO(data))
        fmt, (w, h) = im.format, im.size
        if fmt in JPEG_FORMATS:
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
        raise BadRecord("undecodable_image", f"{path} does not decode: {e}") from e
    if fmt in JPEG_FORMATS:
        return Photo(data, h, w)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=95)
    return Photo(buf.getvalue(), h, w, reencoded=True)


def load_json(path: str | Path):
    """A JSON file, or ConvertError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from e


# --- masks ----------------------------------------------------------------------------------------

def segm_rle(segm, h: int, w: int, what: str) -> dict:
    """A COCO `segmentation` (polygons, uncompressed or compressed RLE) -> compressed RLE (counts bytes) of
    size h x w. Polygons under 3 points are dropped as the peers do; BadRecord for the rest."""
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            raise BadRecord("bad_polygon", f"{what}: no polygon with at least 3 points")
        for p in polys:
            xs, ys = np.asarray(p[0::2], float), np.asarray(p[1::2], float)
            t = POLYGON_TOLERANCE
            if xs.min() < -t or ys.min() < -t or xs.max() > w + t or ys.max() > h + t:
                raise BadRecord("polygon_outside", f"{what}: polygon reaches ({xs.max():.1f}, {ys.max():.1f}) / "
                                f"({xs.min():.1f}, {ys.min():.1f}) outside the {w}x{h} photo")
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(v) for v in segm["size"]] != [h, w]:
            raise BadRecord("rle_size_mismatch", f"{what}: RLE size {segm['size']} != photo {h}x{w}")
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed (iscrowd)
            if sum(counts) != h * w:
                raise BadRecord("bad_rle", f"{what}: RLE runs cover {sum(counts)} pixels, not {h * w}")
            return mask_utils.frPyObjects(segm, h, w)
        text = counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
        if _rle_pixels(text) != h * w:
            raise BadRecord("bad_rle", f"{what}: RLE counts do not cover {h}x{w} pixels")
        return {"size": [h, w], "counts": text.encode("ascii")}
    raise BadRecord("bad_segmentation", f"{what}: segmentation is neither polygons nor RLE")


def union_rle(rles: list[dict]) -> dict:
    return mask_utils.merge(rles) if len(rles) > 1 else rles[0]


def rle_ann(rle: dict, phrase: str, what: str) -> MaskAnn:
    """Compressed RLE (counts bytes or str) -> the sample's mask annotation; an empty mask is a bad record."""
    counts = rle["counts"]
    rle = {"size": [int(v) for v in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    if int(mask_utils.area(rle)) == 0:
        raise BadRecord("empty_mask", f"{what}: the mask is empty")
    box = [float(v) for v in mask_utils.toBbox(rle)]
    return MaskAnn(rle={"size": rle["size"], "counts": rle["counts"].decode("ascii")}, box=box, phrase=phrase)


def mask_rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


# --- conversations --------------------------------------------------------------------------------

SHORT_QUESTIONS = (
    "Can you segment the {} in this image?",
    "Please segment the {} in this image.",
    "What is the {} in this image? Please output the segmentation mask.",
    "Where is the {} in this image? Please answer with a segmentation mask.",
)
LONG_QUESTIONS = ("{} Please output segmentation mask.", "{} Please answer with a segmentation mask.")
ANSWERS = ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].")
EMPTY_ANSWERS = ("Sorry, there is no such object in this image.", "There is no such object in the image.")


def rng_for(*parts) -> random.Random:
    """Template choices are seeded by the record, so a rerun writes the same text."""
    return random.Random("/".join(str(p) for p in parts))


def question(text: str, rng: random.Random, sentence: bool = False) -> str:
    text = text.strip()
    if sentence:
        return rng.choice(LONG_QUESTIONS).format(text)
    return rng.choice(SHORT_QUESTIONS).format(text.rstrip("."))


def conversation(pairs: list[tuple[str, str]]) -> list[dict]:
    """[(question, answer)] -> turns, the image token at the start of the first question."""
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        turns.append({"role": "assistant", "content": a})
    return turns


def seg_answer(rng: random.Random) -> str:
    answer = rng.choice(ANSWERS)
    assert answer.count(SEG_TOKEN) == 1
    return answer


def chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]
