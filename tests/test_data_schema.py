"""USCDF validation: every problem is a bad sample whose message names it; RLE helpers round-trip."""

import json

import numpy as np
import pytest

from datapipes.schema import BadSample, Sample, SchemaError, decode_mask, encode_mask, mask_ann


def sample_dict(n_seg: int = 1, n_masks: int = 1, size=(6, 8)) -> dict:
    mask = np.zeros(size, np.uint8)
    mask[1:3, 2:5] = 1
    answer = "Sure, " + " and ".join(["<p> the red circle </p> [SEG]"] * n_seg) + "."
    return {
        "task": "referring",
        "conversation": [
            {"role": "user", "content": "<image>\nPlease segment the red circle."},
            {"role": "assistant", "content": answer},
        ],
        "masks": [vars(mask_ann(mask, "the red circle")) for _ in range(n_masks)],
        "image_size": list(size),
        "source": {"dataset": "test", "id": "0"},
        "extra": {},
    }


def test_valid_sample_round_trips_through_json():
    d = sample_dict()
    s = Sample.from_json(json.dumps(d))
    assert s.to_dict() == d
    assert s.masks[0].box == [2.0, 1.0, 3.0, 2.0]


def test_seg_count_mismatch_names_both_counts():
    with pytest.raises(SchemaError, match=r"2 \[SEG\] token\(s\) in assistant turns but 1 mask"):
        Sample.from_dict(sample_dict(n_seg=2, n_masks=1))


def test_rle_size_different_from_image_size_is_rejected():
    d = sample_dict()
    d["image_size"] = [6, 9]
    with pytest.raises(SchemaError, match=r"masks\[0\].rle size \[6, 8\] != image_size \[6, 9\]"):
        Sample.from_dict(d)


def test_missing_key_is_named():
    d = sample_dict()
    del d["image_size"]
    with pytest.raises(SchemaError, match="missing key.*image_size"):
        Sample.from_dict(d)


def test_missing_mask_field_is_named():
    d = sample_dict()
    del d["masks"][0]["phrase"]
    with pytest.raises(SchemaError, match=r"masks\[0\] is missing key 'phrase'"):
        Sample.from_dict(d)


def test_unknown_task_is_named():
    d = sample_dict()
    d["task"] = "segment_everything"
    with pytest.raises(SchemaError, match="unknown task 'segment_everything'"):
        Sample.from_dict(d)


def test_seg_in_user_turn_is_rejected():
    d = sample_dict()
    d["conversation"][0]["content"] += " [SEG]"
    with pytest.raises(SchemaError, match="user turns"):
        Sample.from_dict(d)


def test_image_token_must_be_in_first_user_turn():
    d = sample_dict()
    d["conversation"][0]["content"] = "Please segment the red circle."
    with pytest.raises(SchemaError, match="<image>"):
        Sample.from_dict(d)


def test_broken_json_is_a_bad_sample_with_reason_json():
    with pytest.raises(BadSample, match="does not parse") as e:
        Sample.from_json(b'{"task": "referring", ')
    assert e.value.reason == "json"


def test_schema_errors_carry_reason_invalid():
    with pytest.raises(BadSample) as e:
        Sample.from_dict({"task": "referring"})
    assert e.value.reason == "invalid"


def test_encode_decode_mask_is_pixel_identical_and_counts_is_str():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((13, 17)) < 0.4).astype(np.uint8)
        rle = encode_mask(m)
        assert isinstance(rle["counts"], str) and rle["size"] == [13, 17]
        np.testing.assert_array_equal(decode_mask(rle), m)


def test_rle_counts_that_do_not_cover_the_size_are_rejected():
    rle = encode_mask(np.ones((4, 4), np.uint8))
    with pytest.raises(SchemaError, match="cover 16 pixels, its size 4x5 has 20"):
        decode_mask({"size": [4, 5], "counts": rle["counts"]})
    with pytest.raises(SchemaError, match="malformed"):
        decode_mask({"size": [4, 4], "counts": "zzzz"})
