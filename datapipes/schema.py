"""The unified sample (USCDF): one conversation whose `<p> phrase </p> [SEG]` marks own masks in order.

Defines the special token strings, the Sample/MaskAnn dataclasses, their JSON form, and the
validation every reader runs (a failure is a bad sample, raised as BadSample with a reason).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
P_START = "<p>"
P_END = "</p>"
SPECIAL_TOKENS = (IMAGE_TOKEN, SEG_TOKEN, P_START, P_END)  # the order modeling adds them in

TASKS = (
    "referring",
    "multi_referring",
    "empty_referring",
    "box_referring",  # a referring expression annotated with a box only (RefCOCO/Objects365 boxes): rle is null
    "group_referring",  # one [SEG] stands for every instance the expression names: masks[i].instances
    "panoptic_segcap",
    "finegrained_segcap",
    "caption",
    "vqa",
)
ROLES = ("user", "assistant")
REQUIRED_KEYS = ("task", "conversation", "masks", "image_size", "source")


class BadSample(ValueError):
    """A sample the loader skips and counts; `reason` is the counter's name (json, image, invalid, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SchemaError(BadSample):
    def __init__(self, message: str):
        super().__init__("invalid", message)


@dataclass
class MaskAnn:
    rle: dict | None  # pycocotools compressed RLE: {"size": [h, w], "counts": str}; None: box-only
    box: list[float]  # x, y, w, h in pixels
    phrase: str
    # When one [SEG] stands for several instances: each {"rle": RLE or None, "box": [x, y, w, h]};
    # `rle`/`box` above are then their union. Empty: the [SEG] is one instance, the mask itself.
    instances: list[dict] = field(default_factory=list)


@dataclass
class Sample:
    task: str
    conversation: list[dict]  # [{"role": "user" | "assistant", "content": str}, ...]
    masks: list[MaskAnn]
    image_size: list[int]  # [h, w]
    source: dict  # {"dataset": ..., "id": ...}
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        """Validate `d` (raises SchemaError naming the problem) and build the Sample."""
        validate(d)
        masks = [
            MaskAnn(rle=m["rle"], box=list(m["box"]), phrase=m["phrase"], instances=list(m.get("instances", [])))
            for m in d["masks"]
        ]
        return cls(d["task"], d["conversation"], masks, list(d["image_size"]), d["source"], d.get("extra", {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Sample":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise BadSample("json", f"sample JSON does not parse: {e}") from e
        if not isinstance(d, dict):
            raise SchemaError(f"sample JSON must be an object, got {type(d).__name__}")
        return cls.from_dict(d)


def encode_mask(mask: np.ndarray) -> dict:
    """Binary (h, w) mask -> compressed RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_ann(mask: np.ndarray, phrase: str) -> MaskAnn:
    rle = encode_mask(mask)
    return MaskAnn(rle=rle, box=[float(v) for v in mask_utils.toBbox(rle)], phrase=phrase)


def box_ann(mask: np.ndarray, phrase: str) -> MaskAnn:
    """A box-only annotation: the tight box of `mask`, no RLE (as detection data is annotated)."""
    return MaskAnn(rle=None, box=mask_ann(mask, phrase).box, phrase=phrase)


def group_ann(masks: list[np.ndarray], phrase: str) -> MaskAnn:
    """One [SEG] for several instances: the union as the mask, each instance listed."""
    union = mask_ann(np.logical_or.reduce(masks).astype(np.uint8), phrase)
    union.instances = [{"rle": a.rle, "box": a.box} for a in (mask_ann(m, phrase) for m in masks)]
    return union


def decode_mask(rle: dict) -> np.ndarray:
    """Compressed RLE -> (h, w) uint8 in {0, 1}.

    pycocotools decodes a counts string whose runs do not add up to h*w into uninitialised memory
    without complaint, so the run lengths are summed here first and a mismatch is a bad sample.
    """
    h, w = rle["size"]
    total = _rle_pixels(rle["counts"])
    if total < 0:
        raise SchemaError("RLE counts string is malformed")
    if total != h * w:
        raise SchemaError(f"RLE counts cover {total} pixels, its size {h}x{w} has {h * w}")
    return mask_utils.decode(rle)


def _rle_pixels(counts: str) -> int:
    """Sum of the run lengths of a compressed RLE string (pycocotools' rleFrString, 6-bit chars,
    each run after the second stored as a delta to the run two back); -1 when malformed.
    Vectorised with numpy: the loader runs this for every mask of every sample."""
    data = np.frombuffer(counts.encode("ascii", "replace"), np.uint8).astype(np.int64) - 48
    if data.size == 0:
        return 0
    if ((data < 0) | (data >= 64)).any() or data[-1] & 0x20:  # a bad char, or the last value unterminated
        return -1
    ends = np.flatnonzero((data & 0x20) == 0)  # the last char of each value
    starts = np.concatenate(([0], ends[:-1] + 1))
    nchars = ends - starts + 1
    if nchars.max() > 12:  # > 60 bits: no real run is that long
        return -1
    shift = 5 * (np.arange(data.size) - np.repeat(starts, nchars))
    values = np.add.reduceat((data & 0x1F) << shift, starts)
    values = np.where(data[ends] & 0x10, values - (1 << (5 * nchars)), values)  # sign-extend
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run i >= 3 is a delta to run i - 2
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        return -1
    return int(runs.sum())


def validate(d: dict) -> None:
    """Raise SchemaError naming the first problem found in a sample dict; return None when it is valid."""
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise SchemaError(f"missing key(s) {missing}")
    if d["task"] not in TASKS:
        raise SchemaError(f"unknown task {d['task']!r} (known: {', '.join(TASKS)})")
    size = d["image_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise SchemaError(f"image_size must be [h, w] positive ints, got {size!r}")

    conv = d["conversation"]
    if not isinstance(conv, list) or not conv:
        raise SchemaError("conversation must be a non-empty list of turns")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise SchemaError(f"conversation[{i}] must be {{'role': 'user'|'assistant', 'content': str}}, got {turn!r}")
        if not turn["content"].isascii() and not _encodable(turn["content"]):  # e.g. a lone surrogate (\ud800)
            raise SchemaError(f"conversation[{i}].content is not valid Unicode text")
    if conv[0]["role"] != "user" or conv[-1]["role"] != "assistant":
        raise SchemaError("conversation must start with a user turn and end with an assistant turn")
    n_image = sum(t["content"].count(IMAGE_TOKEN) for t in conv)
    if n_image != 1 or IMAGE_TOKEN not in conv[0]["content"]:
        raise SchemaError(f"the first user turn must hold the one {IMAGE_TOKEN} (found {n_image} in the conversation)")
    user_segs = sum(t["content"].count(SEG_TOKEN) for t in conv if t["role"] == "user")
    if user_segs:
        raise SchemaError(f"{SEG_TOKEN} appears {user_segs} time(s) in user turns; only answers own masks")

    masks = d["masks"]
    if not isinstance(masks, list):
        raise SchemaError("masks must be a list")
    n_seg = sum(t["content"].count(SEG_TOKEN) for t in conv if t["role"] == "assistant")
    if n_seg != len(masks):
        raise SchemaError(f"{n_seg} {SEG_TOKEN} token(s) in assistant turns but {len(masks)} mask(s)")
    for i, m in enumerate(masks):
        if not isinstance(m, dict):
            raise SchemaError(f"masks[{i}] must be an object")
        for key in ("rle", "box", "phrase"):
            if key not in m:
                raise SchemaError(f"masks[{i}] is missing key {key!r}")
        _check_region(m, f"masks[{i}]", size)
        instances = m.get("instances", [])
        if not isinstance(instances, list):
            raise SchemaError(f"masks[{i}].instances must be a list")
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict) or "rle" not in inst or "box" not in inst:
                raise SchemaError(f"masks[{i}].instances[{j}] must be {{'rle': RLE or null, 'box': [x, y, w, h]}}")
            _check_region(inst, f"masks[{i}].instances[{j}]", size)
    if d["task"] == "box_referring" and any(m["rle"] is not None for m in masks):
        raise SchemaError("box_referring sample carries an RLE mask")
    if d["task"] == "empty_referring" and masks:
        raise SchemaError("empty_referring sample carries masks")
    if not isinstance(d.get("extra", {}), dict):
        raise SchemaError("extra must be an object")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_region(m: dict, where: str, size) -> None:
    """An annotation's rle (compressed RLE of the image size, or None for box-only) and its box."""
    rle = m["rle"]
    if rle is not None:
        if not isinstance(rle, dict) or not isinstance(rle.get("counts"), str) or "size" not in rle:
            raise SchemaError(f"{where}.rle must be compressed RLE {{'size': [h, w], 'counts': str}} or null")
        rsize = rle["size"]
        if not (isinstance(rsize, (list, tuple)) and all(type(v) is int for v in rsize) and list(rsize) == list(size)):
            raise SchemaError(f"{where}.rle size {rsize!r} != image_size {list(size)}")
    box = m["box"]
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise SchemaError(f"{where}.box must be [x, y, w, h]")
    if rle is None and not (box[2] > 0 and box[3] > 0):
        raise SchemaError(f"{where} is box-only (rle null) but its box {list(box)} is empty")
