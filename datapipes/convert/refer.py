"""RefCOCO, RefCOCO+, RefCOCOg (refs(unc|umd|google).p + instances.json) and gRefCOCO (grefs(unc).json
+ instances.json) -> referring samples over COCO train2014 photos, the refer ids kept in `source`.

A sample is one photo and up to `turns` expressions of it (train: 3, as LISA samples them; eval splits:
1, so every expression is scored once); an image's expressions are interleaved across its refs.
"""

from __future__ import annotations

import pickle
from itertools import chain, zip_longest
from pathlib import Path

from datapipes.convert.common import (
    EMPTY_ANSWERS,
    BadRecord,
    ConvertError,
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
    union_rle,
)
from datapipes.convert.run import Converter
from datapipes.convert.unpickle import load_plain_pickle
from datapipes.schema import Sample


class ReferConverter(Converter):
    """refcoco / refcoco+ (splitBy unc), refcocog (umd; `--split-by google` for the google split)."""

    splits = ("train", "val", "testA", "testB", "test")
    split_by = "unc"

    def __init__(self, args):
        super().__init__(args)
        self.turns = args.turns or (3 if self.split == "train" else 1)
        self.split_by = args.options.get("split_by") or self.split_by
        self.refs = {r["ref_id"]: r for r in self._load_refs()}
        inst_path = self.src / "instances.json"
        inst = load_json(inst_path)
        try:
            self.photos = {im["id"]: im for im in inst["images"]}
            self.anns = {a["id"]: a for a in inst["annotations"]}
        except (KeyError, TypeError) as e:
            raise ConvertError(f"{inst_path}: not COCO instances (images/annotations with ids): {e}") from e

    def _load_refs(self) -> list[dict]:
        path = self.src / f"refs({self.split_by}).p"
        if not path.is_file():
            raise ConvertError(f"{self.name}: {path} does not exist (--src is the folder with instances.json "
                               f"and refs({self.split_by}).p)")
        refs = _plain_pickle(path)
        _check_refs(refs, path)
        return refs

    def units(self):
        by_image: dict[int, list[dict]] = {}
        for ref in sorted(self.refs.values(), key=lambda r: r["ref_id"]):
            if ref["split"] == self.split:
                by_image.setdefault(ref["image_id"], []).append(ref)
        units = []
        for image_id in sorted(by_image):
            for kind, turns in self._turns(by_image[image_id]):
                for k, chunk in enumerate(chunks(turns, self.turns)):
                    units.append((f"{image_id}-{kind}{k}", (image_id, kind, tuple(chunk))))
        return units

    def _turns(self, refs: list[dict]) -> list[tuple[str, list]]:
        """(kind, [(ref_id, sentence index)]) per kind of target; one sentence of each ref in turn."""
        per_ref = [[(r["ref_id"], i) for i in range(len(r["sentences"]))] for r in refs]
        return [("r", [t for t in chain.from_iterable(zip_longest(*per_ref)) if t is not None])]

    def image_path(self, payload) -> Path | None:
        im = self.photos.get(payload[0])
        return self.images / im["file_name"] if im else None

    def convert(self, uid, payload, bad) -> list[Output]:
        image_id, _, turns = payload
        im = self.photos.get(image_id)
        if im is None:
            raise BadRecord("missing_annotation", f"image_id {image_id} is not in instances.json")
        photo = read_photo(self.images / im["file_name"])
        h, w = photo.height, photo.width
        if (im.get("height", h), im.get("width", w)) != (h, w):
            raise BadRecord("size_mismatch", f"{im['file_name']} is {h}x{w}, instances.json says "
                            f"{im.get('height')}x{im.get('width')}")
        rng = rng_for(self.name, self.split, uid)
        pairs, masks, ids = [], [], []
        task = "referring"
        for ref_id, si in turns:
            ref = self.refs[ref_id]
            sent = ref["sentences"][si]
            what = f"ref {ref_id} sentence {sent.get('sent_id')}"
            try:
                task, answer, anns = self._target(ref, sent["sent"], h, w, what, rng)
            except BadRecord as e:
                bad(e.reason, str(e))
                continue
            pairs.append((question(sent["sent"], rng), answer))
            masks += anns
            ids.append({"ref_id": ref_id, "ann_id": ref["ann_id"], "sent_id": sent.get("sent_id"),
                        "sent_ids": list(ref.get("sent_ids", [])), "category_id": ref.get("category_id")})
        if not pairs:
            return []
        source = {"dataset": self.name, "id": uid, "split": self.split, "split_by": self.split_by,
                  "image_id": image_id, "file_name": im["file_name"], "refs": ids}
        sample = Sample(task, conversation(pairs), masks, [h, w], source)
        return [Output(sample, photo.data, reencoded=photo.reencoded)]

    def _target(self, ref: dict, sent: str, h: int, w: int, what: str, rng):
        ann = self.anns.get(ref["ann_id"])
        if ann is None:
            raise BadRecord("missing_annotation", f"{what}: ann_id {ref['ann_id']} is not in instances.json")
        return "referring", seg_answer(rng), [rle_ann(segm_rle(ann["segmentation"], h, w, what), sent, what)]


class GReferConverter(ReferConverter):
    """gRefCOCO: an expression names one target, several (one [SEG] for their union, each instance
    listed: group_referring) or none (ann_id [-1]: empty_referring). Crowd annotations are skipped (ReLA)."""

    splits = ("train", "val", "testA", "testB")

    def _load_refs(self) -> list[dict]:
        path = self.src / f"grefs({self.split_by}).json"
        if path.is_file():
            refs = load_json(path)
        elif path.with_suffix(".p").is_file():
            path = path.with_suffix(".p")
            refs = _plain_pickle(path)
        else:
            raise ConvertError(f"{self.name}: {path} does not exist (--src is the folder with instances.json "
                               f"and grefs({self.split_by}).json)")
        _check_refs(refs, path)
        return refs

    def _turns(self, refs):
        """Expressions grouped by target kind (a sample has one task), each kind interleaved across refs."""
        out = []
        for kind in ("r", "g", "e"):
            same = [r for r in refs if _kind(r) == kind]
            if same:
                out.append((kind, ReferConverter._turns(self, same)[0][1]))
        return out

    def _target(self, ref, sent, h, w, what, rng):
        ids = _ann_ids(ref)
        if not ids:
            return "empty_referring", rng.choice(EMPTY_ANSWERS), []
        rles = []
        for i in ids:
            ann = self.anns.get(i)
            if ann is None:
                raise BadRecord("missing_annotation", f"{what}: ann_id {i} is not in instances.json")
            if not ann.get("iscrowd"):
                rles.append(segm_rle(ann["segmentation"], h, w, f"{what} ann {i}"))
        if not rles:
            raise BadRecord("crowd_only", f"{what}: every target annotation is a crowd region")
        if len(ids) == 1:
            return "referring", seg_answer(rng), [rle_ann(rles[0], sent, what)]
        union = rle_ann(union_rle(rles), sent, what)
        union.instances = [{"rle": a.rle, "box": a.box} for a in (rle_ann(r, sent, what) for r in rles)]
        return "group_referring", seg_answer(rng), [union]


def _plain_pickle(path: Path):
    try:
        return load_plain_pickle(path)
    except pickle.UnpicklingError as e:  # unsafe or unreadable: the run stops here, naming the file
        raise ConvertError(str(e)) from e


def _ann_ids(ref: dict) -> list[int]:
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [] if -1 in ids else ids


def _kind(ref: dict) -> str:
    n = len(_ann_ids(ref))
    return "e" if n == 0 else "r" if n == 1 else "g"


def _check_refs(refs, path) -> None:
    if not isinstance(refs, list):
        raise ConvertError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    for r in refs:
        missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in r]
        if missing:
            raise ConvertError(f"{path}: refs lack key(s) {missing}")
