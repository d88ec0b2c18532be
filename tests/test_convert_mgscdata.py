"""MGSCData's tree-node files: `<k>phrase</k>` tags become `<p> phrase </p> [SEG]` with the node's mask (JSON
string of RLE with base64 counts), root -> panoptic SegCap, subtree:X -> fine-grained; uncaptioned nodes skipped."""

import base64
import json

import numpy as np
from convert_files import write_jpeg
from pycocotools import mask as mask_utils
from test_convert_refer import read_samples

from datapipes.convert import converter_class
from datapipes.convert.run import ConvertArgs, run_conversion
from datapipes.schema import decode_mask


def mglmm_mask(m: np.ndarray) -> str:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return json.dumps({"size": [int(v) for v in r["size"]], "counts": base64.b64encode(r["counts"]).decode()})


def test_mgscdata_nodes_become_segcap_samples(tmp_path):
    h, w = 30, 40
    write_jpeg(tmp_path / "imgs" / "sa_1.jpg", h, w, 0)
    car, wheel, road = (np.zeros((h, w), np.uint8) for _ in range(3))
    car[5:20, 5:30] = 1
    wheel[15:20, 8:14] = 1
    road[20:, :] = 1
    nodes = [
        {"file_name": "sa_1.jpg", "label": "root", "gcg_caption": "A <k1>red car</k1> on <k2>the road</k2>.",
         "gcg_labels": ["k1", "k2"], "k1": {"mask": mglmm_mask(car), "label": "car"},
         "k2": {"mask": mglmm_mask(road), "label": "road"}},
        {"file_name": "sa_1.jpg", "label": "subtree:car", "gcg_caption": "The car has <k1>a wheel</k1>.",
         "gcg_labels": ["k1"], "k1": {"mask": mglmm_mask(wheel), "label": "wheel"}},
        {"file_name": "sa_1.jpg", "label": "subtree:road", "gcg_caption": "", "gcg_labels": []},
    ]
    root = tmp_path / "MGLMM_gcg_new"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "mglmm_sa_1.json").write_text(json.dumps(nodes))
    (root / "MGLMM_train_split.txt").write_text("mglmm_sa_1.json\nmglmm_sa_2.json\n")
    args = ConvertArgs(dataset="mgscdata", src=str(root), out=str(tmp_path / "out"), images=str(tmp_path / "imgs"),
                       min_shards=2)
    manifest = run_conversion(converter_class("mgscdata")(args), args)
    assert manifest["tasks"] == {"finegrained_segcap": 1, "panoptic_segcap": 1}
    assert manifest["convert"]["bad"] == {"missing_annotation": 1}  # sa_2 is listed but absent
    by_task = {s["json"]["task"]: s["json"] for s in read_samples(tmp_path / "out").values()}
    pan, fine = by_task["panoptic_segcap"], by_task["finegrained_segcap"]
    assert pan["conversation"][1]["content"] == "A <p> red car </p> [SEG] on <p> the road </p> [SEG]."
    np.testing.assert_array_equal(decode_mask(pan["masks"][0]["rle"]), car)
    np.testing.assert_array_equal(decode_mask(pan["masks"][1]["rle"]), road)
    assert "car" in fine["conversation"][0]["content"]
    assert fine["conversation"][1]["content"] == "The car has <p> a wheel </p> [SEG]."
    np.testing.assert_array_equal(decode_mask(fine["masks"][0]["rle"]), wheel)
