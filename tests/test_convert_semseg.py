"""Semantic and part sets as LISA samples them: class-name questions whose masks equal the label PNG's
pixels of that class (ignore labels never asked), and PACO-LVIS / PASCAL-Part part phrases whose masks equal
pycocotools' decoding of that category's annotations."""

import json

import numpy as np
import pytest
from convert_files import (
    blocks,
    decode_segm,
    write_coco_parts,
    write_jpeg,
    write_label_png,
)
from test_convert_refer import read_samples

from datapipes.convert import converter_class
from datapipes.convert.run import ConvertArgs, run_conversion
from datapipes.convert.semseg import ADE20K_CLASSES
from datapipes.schema import decode_mask


def convert(dataset, src, out, images=None, **kw):
    args = ConvertArgs(dataset=dataset, src=str(src), out=str(out), images=str(images) if images else None,
                       min_shards=2, **kw)
    return run_conversion(converter_class(dataset)(args), args)


def check_label_samples(out, labels: dict, names: dict, value_of, never: set):
    """Each asked class: its name in the question, its mask == (PNG == value); `never`: not asked."""
    samples = read_samples(out)
    assert len(samples) == len(labels)
    for s in samples.values():
        d = s["json"]
        png = labels[d["source"]["id"]]
        assert d["image_size"] == list(png.shape)
        classes = d["source"]["classes"]
        assert 1 <= len(classes) <= 3 and not set(classes) & never
        questions = [t["content"] for t in d["conversation"] if t["role"] == "user"]
        for c, q, m in zip(classes, questions, d["masks"]):
            assert names[c] in q and m["phrase"] == names[c]
            np.testing.assert_array_equal(decode_mask(m["rle"]), (png == value_of(c)).astype(np.uint8))


def test_ade20k_values_shift_by_one_and_zero_is_never_asked(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    labels = {}
    for i in range(3):
        png = blocks(30 + i, 40, [1, 5, 13, 21][: 2 + i], background=0)
        write_label_png(src / "annotations" / "training" / f"ADE_train_{i:08d}.png", png)
        write_jpeg(src / "images" / "training" / f"ADE_train_{i:08d}.jpg", *png.shape, i)
        labels[f"ADE_train_{i:08d}"] = png
    manifest = convert("ade20k", src, tmp_path / "out")
    assert manifest["total"] == 3
    names = dict(enumerate(ADE20K_CLASSES))
    check_label_samples(tmp_path / "out", labels, names, value_of=lambda c: c + 1, never={255})
    texts = [t["content"] for s in read_samples(tmp_path / "out").values() for t in s["json"]["conversation"]]
    assert any("wall" in t for t in texts) and any("tree" in t for t in texts)


def test_cocostuff_drops_void_and_dashed_classes(tmp_path):
    src, coco = tmp_path / "cocostuff", tmp_path / "coco"
    (src).mkdir()
    (src / "labels.txt").write_text("0: unlabeled\n1: person\n2: bicycle\n3: building-other\n4: grass\n")
    labels = {}
    for i in range(2):
        png = blocks(32, 36 + i, [0, 2, 3], background=255)  # person, building-other, grass; void left
        write_label_png(src / "train2017" / f"{i:012d}.png", png)
        write_jpeg(coco / "train2017" / f"{i:012d}.jpg", *png.shape, i)
        labels[f"{i:012d}"] = png
    convert("cocostuff", src, tmp_path / "out", images=coco)
    names = {0: "person", 1: "bicycle", 3: "grass"}
    check_label_samples(tmp_path / "out", labels, names, value_of=lambda c: c, never={2, 255})
    for s in read_samples(tmp_path / "out").values():
        assert sorted(s["json"]["source"]["classes"]) == [0, 3]


def test_mapillary_v2_palette_pngs_index_the_config_labels(tmp_path):
    src = tmp_path / "mapillary"
    src.mkdir()
    readable = ["Bird", "Road", "Sky", "Car", "Unlabeled"]
    (src / "config_v2.0.json").write_text(json.dumps({"labels": [{"name": n.lower(), "readable": n} for n in readable]}))
    png = blocks(30, 44, [1, 2, 3], background=4)
    write_label_png(src / "training" / "v2.0" / "labels" / "abc.png", png, palette=True)
    write_jpeg(src / "training" / "images" / "abc.jpg", 30, 44, 0)
    convert("mapillary", src, tmp_path / "out")
    names = {i: n.lower() for i, n in enumerate(readable)}
    check_label_samples(tmp_path / "out", {"abc": png}, names, value_of=lambda c: c, never={4})


def test_label_png_of_another_size_is_a_counted_bad_record(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    for i, shape in enumerate([(30, 40), (30, 40)]):
        write_label_png(src / "annotations" / "training" / f"a{i}.png", blocks(*shape, [1], background=0))
        write_jpeg(src / "images" / "training" / f"a{i}.jpg", shape[0], shape[1] + i, i)
    manifest = convert("ade20k", src, tmp_path / "out")
    assert manifest["total"] == 1 and manifest["convert"]["bad"] == {"size_mismatch": 1}


@pytest.mark.parametrize("dataset", ["paco_lvis", "pascal_part"])
def test_part_sets_ask_object_part_phrases_with_the_union_of_their_annotations(tmp_path, dataset):
    if dataset == "paco_lvis":
        names = ["car_(automobile)", "car_(automobile):antenna", "dog:ear"]
        data = write_coco_parts(tmp_path, names, "train2017/0000")
        src, images, path = tmp_path / "paco", tmp_path / "photos", "paco_lvis_v1_train.json"
    else:
        names = ["bus:license plate", "potted plant:pot", "person:hair"]
        data = write_coco_parts(tmp_path, names, "2008_")
        src, images, path = tmp_path / "pascal_part", None, "train.json"
        (src / "VOCdevkit" / "VOC2010").mkdir(parents=True)
        (tmp_path / "photos").rename(src / "VOCdevkit" / "VOC2010" / "JPEGImages")
    src.mkdir(exist_ok=True)
    (src / path).write_text(json.dumps(data))
    manifest = convert(dataset, src, tmp_path / "out", images=images)
    assert manifest["total"] == 3 and manifest["convert"]["bad"] == {}
    words = {1: names[0].split(":")[-1], 2: names[1].split(":")[-1], 3: names[2].split(":")[-1]}
    for s in read_samples(tmp_path / "out").values():
        d = s["json"]
        im = next(im for im in data["images"] if im["id"] == d["source"]["image_id"])
        h, w = im["height"], im["width"]
        assert d["source"]["category_ids"] == [1, 2, 3]
        questions = [t["content"] for t in d["conversation"] if t["role"] == "user"]
        for c, q, m in zip(d["source"]["category_ids"], questions, d["masks"]):
            parts = [decode_segm(a["segmentation"], h, w) for a in data["annotations"]
                     if a["image_id"] == im["id"] and a["category_id"] == c]
            np.testing.assert_array_equal(decode_mask(m["rle"]), np.logical_or.reduce(parts).astype(np.uint8))
            assert words[c].replace("_(automobile)", "") in q and "_(" not in q and ":" not in q
