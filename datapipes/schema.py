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
    rle: dict  # pycocotools compressed RLE: {"size": [h, w], "counts": str}
    box: list[float]  # x, y, w, h in pixels
    phrase: str


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
        masks = [MaskAnn(rle=m["rle"], box=list(m["box"]), phrase=m["phrase"]) for m in d["masks"]]
        return cls(d["task"], d["conversation"], masks, list(d["image_size"]), d["source"], d.get("extra", {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Sample":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
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
    each run after the second stored as a delta to the run two back); -1 when malformed."""
    runs: list[int] = []
    data = counts.encode("ascii", "replace")
    i = 0
    while i < len(data):
        x, k, more = 0, 0, True
        while more:
            if i >= len(data):
                return -1
            c = data[i] - 48
            if not 0 <= c < 64:
                return -1
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return -1
        runs.append(x)
    return sum(runs)


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
        rle = m["rle"]
        if not isinstance(rle, dict) or not isinstance(rle.get("counts"), str) or "size" not in rle:
            raise SchemaError(f"masks[{i}].rle must be compressed RLE {{'size': [h, w], 'counts': str}}")
        if list(rle["size"]) != list(size):
            raise SchemaError(f"masks[{i}].rle size {list(rle['size'])} != image_size {list(size)}")
        if not (isinstance(m["box"], (list, tuple)) and len(m["box"]) == 4):
            raise SchemaError(f"masks[{i}].box must be [x, y, w, h]")
    if d["task"] == "empty_referring" and masks:
        raise SchemaError("empty_referring sample carries masks")
    if not isinstance(d.get("extra", {}), dict):
        raise SchemaError("extra must be an object")
