"""What is scored: a Prediction (one line of a predictions JSONL, masks as RLE at the original image
size) and a Target (read from a benchmark sample's JSON). Both are plain dataclasses; the JSONL form
is the contract of `launcher eval --predictions` (docs/INTERFACES.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datapipes.schema import P_END, P_START, SEG_TOKEN, Sample

_TAG = re.compile(r"<[^>]*>")


@dataclass
class Prediction:
    key: str  # the shard sample's __key__
    answer: str  # the model's text (teacher_forced: the reference answer that was fed)
    masks: list[dict]  # compressed RLE at the original image size, one per [SEG]
    boxes: list[list[float]] | None = None  # x, y, w, h pixels of the original image
    scores: list[float] | None = None  # one per box

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(d)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> Prediction:
        if not isinstance(d, dict) or not isinstance(d.get("key"), str):
            raise ValueError(f"{where}: a prediction needs a string 'key'")
        masks = d.get("masks", [])
        if not isinstance(masks, list) or not all(isinstance(m, dict) and "size" in m and isinstance(m.get("counts"), str) for m in masks):
            raise ValueError(f"{where} key {d['key']!r}: 'masks' must be a list of compressed RLE {{'size', 'counts': str}}")
        boxes, scores = d.get("boxes"), d.get("scores")
        if boxes is not None and (scores is None or len(scores) != len(boxes)):
            raise ValueError(f"{where} key {d['key']!r}: 'boxes' needs 'scores' of the same length")
        return cls(d["key"], str(d.get("answer", "")), masks, boxes, scores)


@dataclass
class Target:
    key: str
    task: str
    dataset: str
    image_size: tuple[int, int]  # (h, w) of the original image
    masks: list[dict | None]  # per [SEG]: RLE, or None for a box-only annotation
    phrases: list[str]  # per [SEG]
    boxes: list[list[float]]  # every target instance's x, y, w, h (box AP)
    answer: str  # the reference assistant text (all assistant turns)
    source: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return plain_caption(self.answer)

    @property
    def captions(self) -> list[str]:
        """Reference captions: extra["captions"] (COCO: all of the photo's), else extra["caption"] (GCG:
        the source caption), else the answer with its tags removed."""
        if self.extra.get("captions"):
            return list(self.extra["captions"])
        return [self.extra.get("caption") or self.caption]


def target_from_sample(key: str, sample: Sample) -> Target:
    boxes = [inst["box"] for m in sample.masks for inst in (m.instances or [{"box": m.box}])]
    answer = " ".join(t["content"] for t in sample.conversation if t["role"] == "assistant")
    return Target(
        key=key, task=sample.task, dataset=str(sample.source.get("dataset", "")), image_size=tuple(sample.image_size),
        masks=[m.rle for m in sample.masks], phrases=[m.phrase for m in sample.masks], boxes=[list(map(float, b)) for b in boxes],
        answer=answer, source=dict(sample.source), extra=dict(sample.extra),
    )


def plain_caption(answer: str) -> str:
    """An answer as GLaMM's GCG reads a caption: tags and [SEG] removed, spaces collapsed."""
    return " ".join(_TAG.sub("", answer.replace(SEG_TOKEN, "")).split())


def phrases_of(answer: str) -> list[str]:
    """The <p> ... </p> phrases of a generated answer, in order (GLaMM's GCG phrases)."""
    return [p.strip() for p in re.findall(re.escape(P_START) + r"(.*?)" + re.escape(P_END), answer, flags=re.DOTALL)]


def write_predictions(path: str | Path, preds: list[Prediction]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in preds:
            f.write(p.to_json() + "\n")


def read_predictions(path: str | Path) -> list[Prediction]:
    """One JSON object a line; a bad line or a repeated key is an error naming the file and line."""
    out, seen = [], set()
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            p = Prediction.from_dict(d, f"{path}:{n}")
            if p.key in seen:
                raise ValueError(f"{path}:{n}: key {p.key!r} predicted twice")
            seen.add(p.key)
            out.append(p)
    return out


def read_targets(shard_dir: str | Path) -> Iterator[Target]:
    """Every sample of a shard folder (manifest.json + tars) as a Target; images are not decoded."""
    import webdataset as wds

    from datapipes.shards import read_manifest

    for shard in read_manifest(shard_dir)["shards"]:
        for raw in wds.tarfile_to_samples()([{"url": shard["url"]}]):
            if "json" in raw:
                yield target_from_sample(raw["__key__"], Sample.from_json(raw["json"]))
