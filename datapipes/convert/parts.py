"""Part segmentation as LISA samples it: PACO-LVIS (paco_lvis_v1_train.json) and PASCAL-Part (VLPart's
train.json), COCO-style files whose categories are `object:part` -> per photo one sample asking for up
to 3 of its categories ("antenna of the car" / "car antenna"), each answered with the union of that
category's annotations in the photo.
"""

from __future__ import annotations

import re
from pathlib import Path

from datapipes.convert.common import (
    BadRecord,
    ConvertError,
    Output,
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
from datapipes.schema import Sample


def part_phrase(category: str, rng) -> str:
    """'car_(automobile):antenna' -> 'antenna of the car' or 'car antenna' (as LISA, 50/50); the question
    templates add the leading 'the'."""
    names = [re.sub(r"_\(.*?\)", "", n).replace("_", " ").strip() for n in category.split(":")]
    if len(names) == 1:
        return names[0]
    obj, part = names[0], names[-1]
    return f"{part} of the {obj}" if rng.random() < 0.5 else f"{obj} {part}"


class PartsConverter(Converter):
    """--src: the folder holding the annotation file; --images: the photo root its file_name is under."""

    splits = ("train",)
    annotation_file = ""
    default_images = ""  # relative to --src when --images is not given

    def __init__(self, args):
        super().__init__(args)
        self.turns = args.turns or 3
        if not args.images and self.default_images:
            self.images = self.src / self.default_images
        path = self.src / self.annotation_file
        data = load_json(path)
        try:
            self.photos = {im["id"]: im for im in data["images"]}
            self.categories = {c["id"]: c["name"] for c in data["categories"]}
            self.by_image: dict[int, list[dict]] = {}
            for a in data["annotations"]:
                self.by_image.setdefault(a["image_id"], []).append(a)
        except (KeyError, TypeError) as e:
            raise ConvertError(f"{path}: not a COCO-style file with images/categories/annotations: {e}") from e

    def units(self):
        return [(str(i), i) for i in sorted(self.by_image) if i in self.photos]

    def _photo_path(self, im: dict) -> Path:
        """file_name may carry a folder (PACO: 'train2017/...'); the bare name is tried too."""
        path = self.images / im["file_name"]
        return path if path.exists() else self.images / Path(im["file_name"]).name

    def image_path(self, payload) -> Path:
        return self._photo_path(self.photos[payload])

    def convert(self, uid, payload, bad) -> list[Output]:
        im = self.photos[payload]
        photo = read_photo(self._photo_path(im))
        h, w = photo.height, photo.width
        by_cat: dict[int, list] = {}
        for a in sorted(self.by_image[payload], key=lambda a: a["id"]):
            what = f"annotation {a.get('id')}"
            if a.get("category_id") not in self.categories:
                bad("unknown_category", f"{what}: category {a.get('category_id')} is not in categories")
                continue
            try:
                by_cat.setdefault(a["category_id"], []).append(segm_rle(a["segmentation"], h, w, what))
            except BadRecord as e:
                bad(e.reason, str(e))
        if not by_cat:
            raise BadRecord("no_annotation", f"image {payload}: no usable annotation")
        rng = rng_for(self.name, self.split, uid)
        chosen = sorted(rng.sample(sorted(by_cat), min(self.turns, len(by_cat))))
        pairs, masks = [], []
        for c in chosen:
            phrase = part_phrase(self.categories[c], rng)
            try:
                masks.append(rle_ann(union_rle(by_cat[c]), phrase, f"image {payload} category {c}"))
            except BadRecord as e:
                bad(e.reason, str(e))
                continue
            pairs.append((question(phrase, rng), seg_answer(rng)))
        if not pairs:
            return []
        source = {"dataset": self.name, "id": uid, "split": self.split, "image_id": payload,
                  "file_name": im["file_name"], "category_ids": chosen}
        sample = Sample("referring", conversation(pairs), masks, [h, w], source)
        return [Output(sample, photo.data, reencoded=photo.reencoded)]


class PacoLvisConverter(PartsConverter):
    """--src vlpart/paco/annotations/, --images coco/ (file_name is 'train2017/<name>.jpg')."""

    annotation_file = "paco_lvis_v1_train.json"


class PascalPartConverter(PartsConverter):
    """--src pascal_part/ (train.json from VLPart's pascal_part_mat2json.py), photos in
    VOCdevkit/VOC2010/JPEGImages under it unless --images says otherwise."""

    annotation_file = "train.json"
    default_images = "VOCdevkit/VOC2010/JPEGImages"
