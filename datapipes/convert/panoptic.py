"""COCO panoptic (panoptic_{split}2017.json + its PNG folder) -> SegCap samples through the MGSC mask tree
(datapipes/mgsc.py): segments become labelled masks (category names cut to their head word, as MGLMM
does: 'wall-other-merged' -> 'wall'), the tree gives a panoptic answer and one fine-grained per subtree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datapipes import mgsc
from datapipes.convert.common import (
    BadRecord,
    ConvertError,
    Output,
    load_json,
    read_photo,
    rng_for,
)
from datapipes.convert.run import Converter


def head_label(name: str) -> str:
    """'wall-other-merged' -> 'wall', 'dining table' -> 'dining table'."""
    return name.split("-")[0].strip()


def rgb2id(png: np.ndarray) -> np.ndarray:
    """panopticapi's segment id of each pixel: R + 256 G + 256^2 B."""
    png = png.astype(np.int64)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


class PanopticConverter(Converter):
    """--src annotations/ (panoptic_train2017.json and the unzipped panoptic_train2017/ PNGs),
    --images coco/train2017."""

    splits = ("train", "val")

    def __init__(self, args):
        super().__init__(args)
        path = self.src / f"panoptic_{self.split}2017.json"
        data = load_json(path)
        try:
            self.labels = {c["id"]: head_label(c["name"]) for c in data["categories"]}
            self.photos = {im["id"]: im for im in data["images"]}
            self.records = {a["image_id"]: a for a in data["annotations"]}
        except (KeyError, TypeError) as e:
            raise ConvertError(f"{path}: not COCO panoptic (categories/images/annotations): {e}") from e
        self.png_dir = self.src / f"panoptic_{self.split}2017"

    def units(self):
        return [(str(i), i) for i in sorted(self.records)]

    def image_path(self, payload) -> Path | None:
        im = self.photos.get(payload)
        return self.images / im["file_name"] if im else None

    def convert(self, uid, payload, bad) -> list[Output]:
        rec, im = self.records[payload], self.photos.get(payload)
        if im is None:
            raise BadRecord("missing_annotation", f"image_id {payload} is not in images")
        photo = read_photo(self.images / im["file_name"])
        png_path = self.png_dir / rec["file_name"]
        try:
            ids = rgb2id(np.asarray(Image.open(png_path).convert("RGB")))
        except FileNotFoundError:
            raise BadRecord("missing_annotation", f"{png_path} does not exist") from None
        except Exception as e:
            raise BadRecord("undecodable_annotation", f"{png_path} does not decode: {e}") from e
        if ids.shape != (photo.height, photo.width):
            raise BadRecord("size_mismatch", f"{png_path} is {ids.shape}, its photo {photo.height}x{photo.width}")
        masks, labels = [], []
        for seg in rec["segments_info"]:
            m = ids == seg["id"]
            if seg.get("category_id") not in self.labels:
                bad("unknown_category", f"segment {seg['id']}: category {seg.get('category_id')} unknown")
            elif not m.any():
                bad("empty_mask", f"segment {seg['id']} has no pixels in {png_path.name}")
            else:
                masks.append(m)
                labels.append(self.labels[seg["category_id"]])
        if not masks:
            raise BadRecord("no_segment", f"{png_path.name}: no usable segment")
        samples = mgsc.annotate(None, masks, lambda _image, _masks: labels, key=uid, dataset=self.name,
                                rng=rng_for(self.name, self.split, uid))
        outs = []
        for s in samples:
            s.source.update(split=self.split, image_id=payload, file_name=im["file_name"])
            outs.append(Output(s, photo.data, reencoded=photo.reencoded))
        return outs
