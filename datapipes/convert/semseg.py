"""Semantic segmentation as LISA samples it: ADE20K (challenge zip), COCO-Stuff (stuffthingmaps) and Mapillary
Vistas v2.0 label PNGs -> per photo one sample asking for up to 3 of its classes by name ("Can you segment
the wall in this image?"), each answered with the class's mask; ignore labels are never asked for.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from datapipes.convert.common import (
    BadRecord,
    ConvertError,
    Output,
    conversation,
    load_json,
    mask_rle,
    question,
    read_photo,
    rle_ann,
    rng_for,
    seg_answer,
)
from datapipes.convert.run import Converter
from datapipes.schema import Sample

IGNORE = 255

# ADE20K SceneParsing's 150 classes in label order (PNG value v is class v - 1; 0 is "other", not evaluated).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)


class LabelMapConverter(Converter):
    """A photo + a label PNG per record; subclasses say where they are and what the values mean."""

    def __init__(self, args):
        super().__init__(args)
        self.turns = args.turns or 3
        self.names = self.class_names()  # label value (after `remap`) -> name; None: never asked

    def class_names(self) -> dict[int, str | None]:
        raise NotImplementedError

    def pairs(self) -> list[tuple[str, Path, Path]]:
        """(uid, photo, label PNG) of the split, sorted."""
        raise NotImplementedError

    def remap(self, label: np.ndarray) -> np.ndarray:
        return label

    def units(self):
        return [(uid, (photo, label)) for uid, photo, label in self.pairs()]

    def image_path(self, payload) -> Path:
        return payload[0]

    def convert(self, uid, payload, bad) -> list[Output]:
        photo_path, label_path = payload
        photo = read_photo(photo_path)
        try:
            label = np.asarray(Image.open(label_path))
        except FileNotFoundError:
            raise BadRecord("missing_annotation", f"{label_path} does not exist") from None
        except Exception as e:
            raise BadRecord("undecodable_annotation", f"{label_path} does not decode: {e}") from e
        if label.ndim != 2 or label.shape != (photo.height, photo.width):
            raise BadRecord("size_mismatch", f"{label_path} is {label.shape}, its photo {photo.height}x{photo.width}")
        label = self.remap(label.astype(np.int64))
        present = [int(v) for v in np.unique(label) if self.names.get(int(v))]
        if not present:
            raise BadRecord("no_class", f"{label_path}: no labelled class (all ignore)")
        rng = rng_for(self.name, self.split, uid)
        chosen = sorted(rng.sample(present, min(self.turns, len(present))))
        pairs = [(question(self.names[c], rng), seg_answer(rng)) for c in chosen]
        masks = [rle_ann(mask_rle(label == c), self.names[c], f"{uid} class {c}") for c in chosen]
        source = {"dataset": self.name, "id": uid, "split": self.split, "file_name": photo_path.name,
                  "classes": chosen}
        sample = Sample("referring", conversation(pairs), masks, [photo.height, photo.width], source)
        return [Output(sample, photo.data, reencoded=photo.reencoded)]


class ADE20KConverter(LabelMapConverter):
    """--src ADEChallengeData2016/ (images/training/*.jpg, annotations/training/*.png)."""

    splits = ("train", "val")

    def class_names(self):
        path = self.args.options.get("class_names")
        names = _read_names(path) if path else list(ADE20K_CLASSES)
        return {i: n for i, n in enumerate(names)}

    def pairs(self):
        sub = {"train": "training", "val": "validation"}[self.split]
        labels = sorted((self.src / "annotations" / sub).glob("*.png"))
        return [(p.stem, self.images / "images" / sub / (p.stem + ".jpg"), p) for p in labels]

    def remap(self, label):
        return np.where(label == 0, IGNORE, label - 1)  # 0 = "other objects" -> ignore, v -> v - 1


class CocoStuffConverter(LabelMapConverter):
    """--src cocostuff/ (train2017/*.png of stuffthingmaps_trainval2017.zip, values = id - 1, 255 void),
    --images coco/ (train2017/*.jpg); class names from labels.txt ("0: unlabeled" ... "182: wood").
    Classes whose name has a '-' (building-other, wall-brick, ...) are dropped as LISA drops them."""

    splits = ("train", "val")

    def class_names(self):
        path = self.args.options.get("class_names") or next(
            (p for p in (self.src / "labels.txt", self.src / "cocostuff_classes.txt") if p.is_file()), None)
        if path is None:
            raise ConvertError(f"{self.name}: no labels.txt in {self.src} (pass --class-names)")
        ids = {}
        for line in Path(path).read_text().splitlines():
            m = re.match(r"\s*(\d+)\s*:\s*(.+?)\s*$", line)
            if m:
                ids[int(m.group(1))] = m.group(2)
        if not ids:
            raise ConvertError(f"{path}: no 'id: name' lines")
        # PNG value v is dataset id v + 1 (id 0 "unlabeled" never occurs: void is 255)
        return {i - 1: (None if "-" in n else n) for i, n in ids.items() if i > 0}

    def pairs(self):
        sub = f"{self.split}2017"
        labels = sorted((self.src / sub).glob("*.png"))
        return [(p.stem, self.images / sub / (p.stem + ".jpg"), p) for p in labels]


class MapillaryConverter(LabelMapConverter):
    """--src mapillary/ (config_v2.0.json, training/images/*.jpg, training/v2.0/labels/*.png): the pixel value
    indexes config labels; "Unlabeled" is dropped (LISA drops nothing; it is void)."""

    splits = ("train", "val")

    def class_names(self):
        cfg = load_json(self.src / "config_v2.0.json")
        try:
            names = [lab["readable"].lower() for lab in cfg["labels"]]
        except (KeyError, TypeError) as e:
            raise ConvertError(f"{self.src / 'config_v2.0.json'}: no labels[i].readable: {e}") from e
        return {i: (None if n == "unlabeled" else n) for i, n in enumerate(names)}

    def pairs(self):
        sub = {"train": "training", "val": "validation"}[self.split]
        labels = sorted((self.src / sub / "v2.0" / "labels").glob("*.png"))
        return [(p.stem, self.images / sub / "images" / (p.stem + ".jpg"), p) for p in labels]


def _read_names(path) -> list[str]:
    """A class-name list: JSON list, or ADE's objectInfo150.csv (Name column, first synonym)."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        return list(json.loads(text))
    return [row["Name"].split(";")[0].strip() for row in csv.DictReader(io.StringIO(text))]
