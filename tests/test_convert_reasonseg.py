"""ReasonSeg converter on LISA's per-image JSON: the mask is the targets painted largest first with the
ignore regions removed, rasterised by pycocotools; sentence instructions get the long template."""

import json

import numpy as np
from convert_files import write_reasonseg
from pycocotools import mask as mask_utils
from test_convert_refer import read_samples

from datapipes.convert import converter_class
from datapipes.convert.run import ConvertArgs, run_conversion
from datapipes.schema import decode_mask


def convert(src, out, split, **kw):
    args = ConvertArgs(dataset="reasonseg", src=str(src), out=str(out), split=split, min_shards=2, **kw)
    return run_conversion(converter_class("reasonseg")(args), args)


def painted(shapes, h, w) -> np.ndarray:
    """LISA's rule, with pycocotools' polygon rasterisation: largest first, target 1, ignore 2."""
    canvas = np.zeros((h, w), np.uint8)
    areas = []
    for s in shapes:
        if s["label"] == "flag":
            continue
        m = mask_utils.decode(mask_utils.frPyObjects([np.ravel(s["points"]).tolist()], h, w))[:, :, 0]
        areas.append((int(m.sum()), s, m))
    for _, s, m in sorted(areas, key=lambda t: -t[0]):
        canvas[m > 0] = 2 if "ignore" in s["label"] else 1
    return canvas


def expected_mask(shapes, h, w) -> np.ndarray:
    return (painted(shapes, h, w) == 1).astype(np.uint8)


def ignore_mask(shapes, h, w) -> np.ndarray:
    return (painted(shapes, h, w) == 2).astype(np.uint8)


def test_train_masks_and_instructions(tmp_path):
    src = write_reasonseg(tmp_path, "train", n=3)
    manifest = convert(src, tmp_path / "out", "train")
    samples = read_samples(tmp_path / "out")
    # img0: 1 text, img1: 2, img2: 3 -> one sample each (up to 3 instructions per sample)
    assert manifest["total"] == 3
    for s in samples.values():
        d = s["json"]
        name = d["source"]["id"]
        meta = json.loads((src / "train" / f"{name}.json").read_text())
        h, w = d["image_size"]
        assert s["jpg"] == (src / "train" / f"{name}.jpg").read_bytes()
        want = expected_mask(meta["shapes"], h, w)
        assert want.any() and not want.all() and 0 < want.sum()
        assert len(d["masks"]) == len(meta["text"])
        for m in d["masks"]:
            np.testing.assert_array_equal(decode_mask(m["rle"]), want)
        questions = [t["content"] for t in d["conversation"] if t["role"] == "user"]
        for q, text in zip(questions, meta["text"]):
            assert text in q
            assert ("segmentation mask." in q) and (q.replace("<image>\n", "").startswith(text) == meta["is_sentence"])


def test_val_uses_the_first_instruction_and_counts_bad_json(tmp_path):
    src = write_reasonseg(tmp_path, "val", n=3)
    (src / "val" / "img1.json").write_text("{not json")
    manifest = convert(src, tmp_path / "out", "val")
    assert manifest["total"] == 2 and manifest["convert"]["bad"] == {"bad_json": 1}
    for s in read_samples(tmp_path / "out").values():
        d = s["json"]
        assert len(d["masks"]) == 1
        # the ignore region travels with the sample: evaluation leaves its pixels out (LISA's label 255)
        meta = json.loads((src / "val" / f"{d['source']['id']}.json").read_text())
        h, w = d["image_size"]
        want_ignore = ignore_mask(meta["shapes"], h, w)
        assert want_ignore.any()
        np.testing.assert_array_equal(decode_mask(d["extra"]["ignore"]), want_ignore)
        assert not (decode_mask(d["masks"][0]["rle"]).astype(bool) & want_ignore.astype(bool)).any()


def test_explanatory_entries_add_a_sample_whose_answer_explains(tmp_path):
    src = write_reasonseg(tmp_path, "train", n=2)
    (src / "explanatory").mkdir()
    (src / "explanatory" / "train.json").write_text(json.dumps(
        [{"image": "img1.jpg", "query": "What keeps the rain off?", "outputs": "The roof covers the house."}]))
    manifest = convert(src, tmp_path / "out", "train")
    assert manifest["total"] == 3
    (ex,) = [s["json"] for s in read_samples(tmp_path / "out").values() if s["json"]["source"].get("explanatory")]
    assert ex["source"]["id"] == "img1"
    assert ex["conversation"][0]["content"] == "<image>\nWhat keeps the rain off? Please output segmentation mask and explain why."
    assert ex["conversation"][1]["content"].endswith("[SEG]. The roof covers the house.")
    meta = json.loads((src / "train" / "img1.json").read_text())
    np.testing.assert_array_equal(decode_mask(ex["masks"][0]["rle"]), expected_mask(meta["shapes"], *ex["image_size"]))
