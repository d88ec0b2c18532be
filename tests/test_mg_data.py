"""Targets the multigranular decoder needs from the data: box-only annotations (rle null), one [SEG]
standing for several instances (MaskAnn.instances), and the Batch's instance-level fields, which for
ordinary samples are exactly one instance per [SEG]."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from datapipes.collate import collate
from datapipes.loader import Decoder
from datapipes.schema import (
    SPECIAL_TOKENS,
    Sample,
    SchemaError,
    box_ann,
    group_ann,
    mask_ann,
)
from datapipes.synthetic import build_tokenizer, generate

MIX = {"box_referring": 0.5, "group_referring": 0.5}


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return t


def raw(image: np.ndarray, sample: Sample, key: str = "k") -> dict:
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    return {"__key__": key, "png": png.getvalue(), "json": sample.to_json().encode()}


def referring(task: str, anns, h=32, w=48) -> tuple[np.ndarray, Sample]:
    answer = "Sure, " + " and ".join("<p> the red circle </p> [SEG]" for _ in anns) + "."
    conv = [{"role": "user", "content": "<image>\nPlease segment the red circle."}, {"role": "assistant", "content": answer}]
    return np.zeros((h, w, 3), np.uint8), Sample(task, conv, anns, [h, w], {"dataset": "t", "id": "0"})


def rect(y0, y1, x0, x1, h=32, w=48) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_synthetic_box_only_and_group_samples_validate_and_use_only_known_words(tok):
    samples = list(generate(40, seed=2, mix=MIX))
    assert {s.task for _, _, s in samples} == set(MIX)
    for _, _, s in samples:
        Sample.from_dict(s.to_dict())
        text = " ".join(t["content"] for t in s.conversation)
        assert tok.unk_token_id not in tok(text)["input_ids"]
        if s.task == "box_referring":
            assert [m.rle for m in s.masks] == [None] and s.masks[0].box[2] > 0
        else:
            assert len(s.masks) == 1 and 2 <= len(s.masks[0].instances) <= 3


def test_box_referring_with_a_mask_and_box_only_with_an_empty_box_are_rejected():
    _, s = referring("box_referring", [mask_ann(rect(2, 6, 3, 9), "the red circle")])
    with pytest.raises(SchemaError, match="box_referring sample carries an RLE mask"):
        Sample.from_dict(s.to_dict())
    d = referring("referring", [box_ann(rect(2, 6, 3, 9), "the red circle")])[1].to_dict()
    d["masks"][0]["box"] = [3.0, 2.0, 0.0, 4.0]
    with pytest.raises(SchemaError, match=r"masks\[0\] is box-only \(rle null\) but its box"):
        Sample.from_dict(d)


def test_ordinary_samples_get_one_instance_per_seg_with_the_masks_boxes(tok):
    image, s = referring("referring", [mask_ann(rect(2, 6, 3, 9), "a"), mask_ann(rect(10, 20, 30, 40), "b")])
    decode = Decoder(tok, num_image_tokens=4, max_length=200)
    batch = collate([decode(raw(image, s))], pad_id=tok.pad_token_id, clip_size=32, sam_size=96)
    assert batch.gt_instance_masks[0] is batch.gt_masks[0]
    assert batch.gt_owner[0].tolist() == [0, 1] and batch.has_mask[0].tolist() == [True, True]
    # 32 x 48 image -> 64 x 96 inside the 96 x 96 frame: scale 2; box (x 3..9, y 2..6) -> cx 12, cy 8, w 12, h 8
    assert batch.gt_boxes[0][0].tolist() == pytest.approx([12 / 96, 8 / 96, 12 / 96, 8 / 96])
    assert "gt_boxes" not in batch.model_inputs()  # the model derives the same from gt_masks


def test_box_only_and_group_annotations_become_instances(tok):
    decode = Decoder(tok, num_image_tokens=4, max_length=200)
    image, boxed = referring("box_referring", [box_ann(rect(2, 6, 3, 9), "the red circle")])
    parts = [rect(2, 6, 3, 9), rect(10, 20, 30, 40), rect(25, 30, 0, 5)]
    _, grouped = referring("group_referring", [group_ann(parts, "the red objects")])
    batch = collate([decode(raw(image, boxed)), decode(raw(image, grouped))], pad_id=tok.pad_token_id, clip_size=32, sam_size=48)
    # box-only: the [SEG]'s mask is empty and flagged, its box is the annotation's
    assert batch.has_mask[0].tolist() == [False] and batch.gt_masks[0].sum() == 0
    assert batch.gt_boxes[0][0].tolist() == pytest.approx([6 / 48, 4 / 48, 6 / 48, 4 / 48])
    # group: one [SEG], three instances it owns; gt_masks holds their union for the sam decoder
    assert batch.gt_owner[1].tolist() == [0, 0, 0] and batch.has_mask[1].all()
    assert batch.gt_masks[1].shape == (1, 48, 48) and batch.gt_instance_masks[1].shape == (3, 48, 48)
    assert torch.equal(batch.gt_masks[1][0], batch.gt_instance_masks[1].amax(0))


def test_batches_with_box_only_or_group_targets_hand_the_instances_to_the_model(tok):
    decode = Decoder(tok, num_image_tokens=4, max_length=200)
    image, plain = referring("referring", [mask_ann(rect(2, 6, 3, 9), "a")])
    _, boxed = referring("box_referring", [box_ann(rect(2, 6, 3, 9), "the red circle")])
    batch = collate([decode(raw(image, plain)), decode(raw(image, boxed))], pad_id=tok.pad_token_id, clip_size=32, sam_size=48)
    inputs = batch.model_inputs()
    assert inputs["has_mask"] is batch.has_mask and inputs["gt_boxes"] is batch.gt_boxes
    assert inputs["gt_owner"] is batch.gt_owner and inputs["gt_instance_masks"] is batch.gt_instance_masks
