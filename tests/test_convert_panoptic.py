"""COCO panoptic -> SegCap through the MGSC mask tree: segments decoded from the PNG's RGB ids, category
names cut to their head word, same-label segments merged into one grounded phrase and mask."""

import numpy as np
from convert_files import write_panoptic
from test_convert_refer import read_samples

from datapipes.convert import converter_class
from datapipes.convert.run import ConvertArgs, run_conversion
from datapipes.schema import decode_mask

HEAD = {187: "wall", 184: "tree", 1: "person", 7: "car"}


def test_panoptic_answers_own_the_union_of_their_label_segments(tmp_path):
    segs_of = write_panoptic(tmp_path, n=2)
    args = ConvertArgs(dataset="coco_panoptic", src=str(tmp_path / "annotations"), out=str(tmp_path / "out"),
                       images=str(tmp_path / "coco" / "train2017"), min_shards=2)
    manifest = run_conversion(converter_class("coco_panoptic")(args), args)
    assert manifest["tasks"] == {"panoptic_segcap": 2} and manifest["convert"]["bad"] == {}
    for s in read_samples(tmp_path / "out").values():
        d = s["json"]
        ids, info = segs_of[d["source"]["image_id"]]
        answer = d["conversation"][1]["content"]
        assert answer.count("[SEG]") == len(d["masks"]) == 4  # wall, tree, two persons merged, car
        assert "<p> two persons </p> [SEG]" in answer
        for m in d["masks"]:
            label = next(lab for lab in HEAD.values() if lab in m["phrase"])
            want = np.isin(ids, [x["id"] for x in info if HEAD[x["category_id"]] == label])
            np.testing.assert_array_equal(decode_mask(m["rle"]), want.astype(np.uint8))
