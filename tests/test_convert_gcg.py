"""GranD-f GCG files (GranDf_HA/OpenPSG groundings, RefCOCOg-GCG refs with polygons, Flickr COCO-style
sam_mask) -> `<p> phrase </p> [SEG]` captions whose masks equal pycocotools' decoding of the source."""

import json
import random

import numpy as np
import pytest
from convert_files import decode_segm, polygon, rle_str, write_jpeg
from test_convert_refer import read_samples

from datapipes.convert import converter_class
from datapipes.convert.run import ConvertArgs, run_conversion
from datapipes.schema import decode_mask

CAPTION = "A man in a red hat walks a small dog on the beach."
PHRASES = ["A man", "a red hat", "a small dog"]


def masks_for(h, w):
    out = []
    for k in range(3):
        m = np.zeros((h, w), np.uint8)
        m[2 + 5 * k : 8 + 5 * k, 3 + 4 * k : 12 + 4 * k] = 1
        out.append(m)
    return out


def write_gcg(root, kind):
    """The annotation file of `kind` in GranDf/annotations/train and its photos; returns the expected
    [(phrase, segmentation)] per photo name."""
    rng = random.Random(0)
    h, w = 36, 44
    expect, records = {}, []
    for i in range(2):
        name = f"img_{i}.jpg"
        write_jpeg(root / "photos" / name, h, w, i)
        segs = [rle_str(m) for m in masks_for(h, w)]
        if kind == "refcocog":
            segs = [[polygon(rng, h, w)] for _ in PHRASES]
        spans = [(CAPTION.find(p), CAPTION.find(p) + len(p)) for p in PHRASES]
        expect[name] = list(zip(PHRASES, segs))
        if kind in ("grandf", "psg"):
            records.append({"file_name": name, "caption": CAPTION, "height": h, "width": w, "image_id": i,
                            "groundings": {p: {"token_positives": list(s), "rle_masks": [g]}
                                           for p, s, g in zip(PHRASES, spans, segs)}})
        elif kind == "refcocog":
            records.append({f"key{i}": {"img_file_name": name, "caption": CAPTION,
                                        "refs": [{"sentence": p.lower(), "segmentation": g}
                                                 for p, g in zip(PHRASES, segs)]}})
    if kind == "flickr":
        images = [{"id": i, "file_name": n, "caption": CAPTION, "height": h, "width": w} for i, n in enumerate(expect)]
        anns = [{"image_id": i, "tokens_positive": [[CAPTION.find(p), CAPTION.find(p) + len(p)]], "sam_mask": g,
                 "bbox": [0, 0, 1, 1], "area": 1} for i, n in enumerate(expect) for p, g in expect[n]]
        anns.append({"image_id": 0, "tokens_positive": [[0, 5]], "sam_mask": segs[1], "ignore": 1})
        records = {"images": images, "annotations": anns}
    file = {"grandf": "GranDf_HA_GCG_train.json", "psg": "OpenPsgGCG_train.json",
            "refcocog": "RefCOCOg_GCG_train.json", "flickr": "flickr_mergedGT_GCG_train.json"}[kind]
    (root / "annotations" / "train").mkdir(parents=True)
    (root / "annotations" / "train" / file).write_text(json.dumps(records))
    return expect, (h, w)


@pytest.mark.parametrize("kind", ["grandf", "psg", "refcocog", "flickr"])
def test_gcg_caption_grounds_each_phrase_with_its_mask(tmp_path, kind):
    expect, (h, w) = write_gcg(tmp_path, kind)
    args = ConvertArgs(dataset="gcg", src=str(tmp_path / "annotations" / "train"), out=str(tmp_path / "out"),
                       images=str(tmp_path / "photos"), split=f"{kind}_train", min_shards=2)
    manifest = run_conversion(converter_class("gcg")(args), args)
    assert manifest["total"] == 2 and manifest["convert"]["bad"] == {}
    for s in read_samples(tmp_path / "out").values():
        d = s["json"]
        answer = d["conversation"][1]["content"]
        assert answer == ("<p> A man </p> [SEG] in <p> a red hat </p> [SEG] walks <p> a small dog </p> [SEG] "
                          "on the beach.")
        assert d["task"] == "panoptic_segcap"
        for m, (phrase, segm) in zip(d["masks"], expect[d["source"]["file_name"]]):
            assert m["phrase"] == phrase
            np.testing.assert_array_equal(decode_mask(m["rle"]), decode_segm(segm, h, w))


def test_a_phrase_missing_from_the_caption_is_dropped_and_counted(tmp_path):
    write_gcg(tmp_path, "refcocog")
    path = tmp_path / "annotations" / "train" / "RefCOCOg_GCG_train.json"
    data = json.loads(path.read_text())
    data[0]["key0"]["refs"][1]["sentence"] = "a blue boat"
    path.write_text(json.dumps(data))
    args = ConvertArgs(dataset="gcg", src=str(path.parent), out=str(tmp_path / "out"), images=str(tmp_path / "photos"),
                       split="refcocog_train", min_shards=1)
    manifest = run_conversion(converter_class("gcg")(args), args)
    assert manifest["total"] == 2 and manifest["convert"]["bad"] == {"phrase_not_found": 1}
    answers = {s["json"]["source"]["file_name"]: s["json"]["conversation"][1]["content"]
               for s in read_samples(tmp_path / "out").values()}
    assert answers["img_0.jpg"] == "<p> A man </p> [SEG] in a red hat walks <p> a small dog </p> [SEG] on the beach."
