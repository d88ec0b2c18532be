"""Synthetic scenes: deterministic, valid, and learnable (targets named by colour AND class), plus the
word-level tokenizer and its Vicuna-v1 chat template."""

from collections import Counter

import numpy as np
import pytest

from datapipes.config import SyntheticConfig
from datapipes.schema import SPECIAL_TOKENS, Sample, decode_mask
from datapipes.shards import read_manifest
from datapipes.synthetic import SYSTEM, VICUNA_V1_TEMPLATE, build_tokenizer, generate, write_synthetic

N = 300


@pytest.fixture(scope="module")
def samples():
    return list(generate(N, seed=5))


def test_same_seed_same_samples_other_seed_other_samples(samples):
    again = list(generate(20, seed=5))
    for (k1, img1, s1), (k2, img2, s2) in zip(samples[:20], again):
        assert k1 == k2 and s1.to_dict() == s2.to_dict()
        np.testing.assert_array_equal(img1, img2)
    other = list(generate(20, seed=6))
    assert sum(np.array_equal(a[1], b[1]) for a, b in zip(samples, other)) == 0


def test_every_sample_validates_and_all_tasks_occur(samples):
    for _, image, s in samples:
        Sample.from_dict(s.to_dict())
        assert image.shape == (64, 64, 3) and s.image_size == [64, 64]
        for m in s.masks:
            assert decode_mask(m.rle).sum() > 0
    tasks = Counter(s.task for _, _, s in samples)
    assert set(tasks) == {"referring", "multi_referring", "empty_referring", "panoptic_segcap", "finegrained_segcap"}
    assert 0.4 < tasks["referring"] / N < 0.6


def test_every_sample_lists_all_whole_objects(samples):
    for _, _, s in samples:
        objects = s.extra["objects"]
        assert 2 <= len(objects) <= 4
        union = np.zeros((64, 64), bool)
        for o in objects:
            m = decode_mask(o["rle"]).astype(bool)
            assert not (union & m).any(), "objects overlap"
            union |= m
        for m in s.masks:  # every target lies on an object
            assert not (decode_mask(m.rle).astype(bool) & ~union).any()


def test_referring_target_is_unique_by_colour_and_class_with_distractors(samples):
    referring = [s for _, _, s in samples if s.task == "referring"]
    assert any(s.extra["query"]["part"] for s in referring), "no part references"
    for s in referring:
        q = s.extra["query"]
        objs = s.extra["objects"]
        same = [o for o in objs if (o["colour"], o["label"]) == (q["colour"], q["class"])]
        assert len(same) == 1
        assert any(o["label"] == q["class"] and o["colour"] != q["colour"] for o in objs)
        assert any(o["colour"] == q["colour"] and o["label"] != q["class"] for o in objs)
        target = decode_mask(same[0]["rle"])
        got = decode_mask(s.masks[0].rle)
        if q["part"] is None:
            np.testing.assert_array_equal(got, target)
            assert s.masks[0].phrase == f"the {q['colour']} {q['class']}"
        else:
            assert (got <= target).all() and got.sum() < target.sum()
            assert s.masks[0].phrase == f"the {q['part']} of the {q['colour']} {q['class']}"
        assert s.masks[0].phrase.removeprefix("the ") in s.conversation[0]["content"]


def test_empty_referring_has_no_seg_and_the_combination_is_absent(samples):
    empty = [s for _, _, s in samples if s.task == "empty_referring"]
    assert empty
    for s in empty:
        q = s.extra["query"]
        assert s.masks == [] and "[SEG]" not in s.conversation[-1]["content"]
        assert f"no {q['colour']} {q['class']}" in s.conversation[-1]["content"]
        assert not any((o["colour"], o["label"]) == (q["colour"], q["class"]) for o in s.extra["objects"])


def test_multi_referring_masks_are_all_matches_left_to_right(samples):
    multi = [s for _, _, s in samples if s.task == "multi_referring"]
    assert multi
    for s in multi:
        q = s.extra["query"]
        matches = [o for o in s.extra["objects"] if o["colour"] == q["colour"] or o["label"] == q["class"]]
        assert len(s.masks) == len(matches) >= 2
        xs = [np.nonzero(decode_mask(m.rle))[1].mean() for m in s.masks]
        assert xs == sorted(xs)


def test_write_synthetic_writes_train_and_held_out_val(tmp_path):
    cfg = SyntheticConfig(out_dir=str(tmp_path), num_train=120, num_val=30, samples_per_shard=50)
    train_dir, val_dir = write_synthetic(cfg)
    train, val = read_manifest(train_dir), read_manifest(val_dir)
    assert [s["count"] for s in train["shards"]] == [50, 50, 20] and val["total"] == 30
    assert sum(train["tasks"].values()) == 120


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return t


def test_tokenizer_has_no_special_tokens_until_modeling_adds_them():
    t = build_tokenizer()
    assert all(s not in t.get_vocab() for s in SPECIAL_TOKENS)
    assert (t.bos_token, t.eos_token, t.pad_token, t.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")


def test_added_special_tokens_are_single_ids(tok):
    n = len(build_tokenizer())
    ids = [tok.encode(s, add_special_tokens=False) for s in SPECIAL_TOKENS]
    assert ids == [[n], [n + 1], [n + 2], [n + 3]]
    text = tok.encode("Sure, <p> the red house </p> [SEG].", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(text) == ["Sure", ",", "<p>", "the", "red", "house", "</p>", "[SEG]", "."]


def test_no_synthetic_word_is_unknown(tok, samples):
    for _, _, s in samples:
        ids = tok.apply_chat_template(s.conversation, tokenize=True, return_dict=True)["input_ids"]
        assert tok.unk_token_id not in ids, s.conversation


def test_chat_template_renders_the_vicuna_v1_format(tok):
    conv = [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "no"}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text == f"<s>{SYSTEM} USER: <image>\nhi ASSISTANT: yes</s>USER: more ASSISTANT: no</s>"
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s>{SYSTEM} USER: <image>\nhi ASSISTANT:"
    assert "{% generation %}" in VICUNA_V1_TEMPLATE


def test_every_synthetic_sample_fits_the_default_max_length(tok, samples):
    from datapipes.config import DataConfig
    from datapipes.text import image_token_id, tokenize_conversation

    for _, _, s in samples:  # raises TooLong otherwise
        tokenize_conversation(s.conversation, tok, image_id=image_token_id(tok), num_image_tokens=16,
                              max_length=DataConfig().max_length)
