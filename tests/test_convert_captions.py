"""Mask-free sets: LLaVA-Pretrain / LLaVA-Instruct conversations (the <image> moved to the front of the
first human turn, a leading gpt turn dropped, text-only records counted) and COCO captions."""

import io
import json

from convert_files import write_jpeg, write_llava
from PIL import Image
from test_convert_refer import read_samples

from datapipes.convert import converter_class
from datapipes.convert.run import ConvertArgs, run_conversion


def convert(dataset, src, images, out, split=None):
    args = ConvertArgs(dataset=dataset, src=str(src), out=str(out), images=str(images), split=split, min_shards=2)
    return run_conversion(converter_class(dataset)(args), args)


def test_llava_instruct_conversations(tmp_path):
    records = write_llava(tmp_path)
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps(records))
    manifest = convert("llava_instruct", tmp_path, tmp_path / "images", tmp_path / "out")
    assert manifest["tasks"] == {"vqa": 5} and manifest["convert"]["bad"] == {"no_image": 1}
    assert manifest["convert"]["reencoded_images"] == 1
    by_id = {s["json"]["source"]["record_id"]: s for s in read_samples(tmp_path / "out").values()}
    first = by_id["000000001"]["json"]["conversation"]
    assert first == [{"role": "user", "content": "<image>\nWhat is this?"},
                     {"role": "assistant", "content": "A picture number 1."},
                     {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Nothing else."}]
    assert by_id["000000002"]["jpg"] == (tmp_path / "images" / "00001" / "000000002.jpg").read_bytes()
    png = by_id["png"]
    assert png["json"]["conversation"][0] == {"role": "user", "content": "<image>\nQ?"}  # leading gpt turn dropped
    im = Image.open(io.BytesIO(png["jpg"]))
    assert im.format == "JPEG" and im.size == (22, 20)


def test_llava_pretrain_is_captions(tmp_path):
    records = write_llava(tmp_path)[:4]
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    manifest = convert("llava_pretrain", tmp_path, tmp_path / "images", tmp_path / "out")
    assert manifest["tasks"] == {"caption": 4} and manifest["total"] == 4


def test_coco_caption_one_sample_per_photo_all_captions_kept(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 24} for i in range(3)]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f"photo {i} caption {k}. "} for i in range(3) for k in range(5)]
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for im in images[:2]:  # the third photo is missing
        write_jpeg(tmp_path / "train2017" / im["file_name"], 20, 24, im["id"])
    manifest = convert("coco_caption", tmp_path / "ann", tmp_path / "train2017", tmp_path / "out")
    assert manifest["tasks"] == {"caption": 2} and manifest["convert"]["bad"] == {"missing_image": 1}
    for s in read_samples(tmp_path / "out").values():
        d = s["json"]
        i = d["source"]["image_id"]
        assert d["extra"]["captions"] == [f"photo {i} caption {k}." for k in range(5)]
        assert d["conversation"][1]["content"] in d["extra"]["captions"]
