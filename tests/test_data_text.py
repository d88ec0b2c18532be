"""Tokenisation with the chat template: what the loss sees (labels), image placeholders, prompt prefix."""

import pytest

from datapipes.schema import SPECIAL_TOKENS
from datapipes.synthetic import build_tokenizer
from datapipes.text import (
    IGNORE_INDEX,
    TooLong,
    cut_points,
    fit_conversation,
    image_token_id,
    tokenize_conversation,
)

N_IMG = 16
CONV = [
    {"role": "user", "content": "<image>\nPlease segment the red house."},
    {"role": "assistant", "content": "Sure, <p> the red house </p> [SEG]."},
]


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return t


def run(tok, conv=CONV, max_length=200):
    return tokenize_conversation(conv, tok, image_id=image_token_id(tok), num_image_tokens=N_IMG, max_length=max_length)


def test_labels_keep_exactly_the_assistant_answer_and_its_eos(tok):
    t = run(tok)
    kept = [i for i, l in zip(t.input_ids, t.labels) if l != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(kept) == ["Sure", ",", "<p>", "the", "red", "house", "</p>", "[SEG]", ".", "</s>"]
    assert all(l == i for i, l in zip(t.input_ids, t.labels) if l != IGNORE_INDEX)


def test_user_turn_system_prompt_and_image_tokens_are_masked(tok):
    t = run(tok)
    n_prompt = len(t.prompt_ids)
    assert all(l == IGNORE_INDEX for l in t.labels[:n_prompt])
    img = image_token_id(tok)
    assert all(l == IGNORE_INDEX for i, l in zip(t.input_ids, t.labels) if i == img)


def test_seg_p_tokens_are_in_the_labels(tok):
    t = run(tok)
    for s in ("[SEG]", "<p>", "</p>"):
        assert tok.convert_tokens_to_ids(s) in t.labels


def test_image_token_expands_to_n_contiguous_copies(tok):
    t = run(tok)
    img = image_token_id(tok)
    first = t.input_ids.index(img)
    assert t.input_ids.count(img) == N_IMG
    assert t.input_ids[first : first + N_IMG] == [img] * N_IMG
    assert len(t.input_ids) == len(t.labels)


def test_prompt_ids_is_the_prefix_up_to_assistant_colon(tok):
    t = run(tok)
    assert t.input_ids[: len(t.prompt_ids)] == t.prompt_ids
    assert tok.convert_ids_to_tokens(t.prompt_ids[-2:]) == ["ASSISTANT", ":"]
    assert t.prompt_ids[0] == tok.bos_token_id
    gen = tok.apply_chat_template(CONV[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert len(t.prompt_ids) == len(gen) + N_IMG - 1  # the same text, with the image expanded


def test_multi_turn_labels_both_answers_and_prompt_ends_at_the_last_turn(tok):
    conv = CONV + [{"role": "user", "content": "Please segment the blue circle."},
                   {"role": "assistant", "content": "It is <p> the blue circle </p> [SEG]."}]
    t = run(tok, conv)
    kept = tok.convert_ids_to_tokens([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE_INDEX])
    assert kept.count("</s>") == 2 and kept.count("[SEG]") == 2
    assert "Please" not in kept and "USER" not in kept and kept.count("blue") == 1  # user turns masked
    prompt = tok.convert_ids_to_tokens(t.prompt_ids)
    assert prompt[-2:] == ["ASSISTANT", ":"] and prompt.count("ASSISTANT") == 2
    assert "blue" in prompt and "It" not in prompt


def test_too_long_is_a_bad_sample_not_truncated(tok):
    n = len(run(tok).input_ids)
    assert len(run(tok, max_length=n).input_ids) == n
    with pytest.raises(TooLong, match=f"{n} tokens .* > max_length {n - 1}") as e:
        run(tok, max_length=n - 1)
    assert e.value.reason == "too_long"


def test_tokenizer_without_image_token_is_refused():
    with pytest.raises(ValueError, match="add the special tokens first"):
        image_token_id(build_tokenizer())


# --- over-length policy: cut answers at a phrase boundary --------------------------------------------

THREE = [
    {"role": "user", "content": "<image>\nSegment the trees."},
    {"role": "assistant", "content": "Sure, <p> the green tree </p> [SEG], <p> the red tree </p> [SEG] and <p> the blue tree </p> [SEG]."},
]


def fit(tok, conv, max_length):
    return fit_conversation(conv, tok, image_id=image_token_id(tok), num_image_tokens=N_IMG, max_length=max_length)


def test_cut_points_never_split_a_phrase_from_its_seg():
    answer = THREE[1]["content"]
    cuts = [answer[:p] for p in cut_points(answer)]
    assert cuts == ["Sure, <p> the green tree </p> [SEG]", "Sure, <p> the green tree </p> [SEG], <p> the red tree </p> [SEG]",
                    "Sure, <p> the green tree </p> [SEG], <p> the red tree </p> [SEG] and <p> the blue tree </p> [SEG]"]
    # a phrase without a mask may end an answer; a sentence end inside a phrase may not
    assert [("A <p> x. y </p> z. B",)[0][:p] for p in cut_points("A <p> x. y </p> z. B")] == ["A <p> x. y </p>", "A <p> x. y </p> z."]


def test_a_conversation_that_fits_is_not_cut(tok):
    tokens, conv = fit(tok, THREE, 200)
    assert conv is THREE and tokens.input_ids == run(tok, THREE).input_ids


def test_too_long_answer_keeps_the_longest_prefix_ending_after_a_seg(tok):
    three_segs = [THREE[0], {"role": "assistant", "content": THREE[1]["content"][:-1]}]  # only the "." cut
    assert fit(tok, THREE, len(run(tok, THREE).input_ids) - 1)[1] == three_segs
    limit = len(run(tok, three_segs).input_ids) - 1
    tokens, conv = fit(tok, THREE, limit)
    assert conv[-1]["content"] == "Sure, <p> the green tree </p> [SEG], <p> the red tree </p> [SEG]"
    assert len(tokens.input_ids) <= limit
    seg, p_start = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<p>")
    assert tokens.input_ids.count(seg) == 2 and tokens.input_ids.count(p_start) == 2  # no orphan phrase or [SEG]
    assert tokens.labels[-1] == tok.eos_token_id  # the cut answer still ends with eos


def test_later_turns_are_dropped_before_the_first_answer_is_cut(tok):
    conv = THREE + [{"role": "user", "content": "And the sky?"}, {"role": "assistant", "content": "<p> the sky </p> [SEG]."}]
    _, kept = fit(tok, conv, len(run(tok, THREE).input_ids))
    assert kept == THREE[:1] + [{"role": "assistant", "content": THREE[1]["content"]}]


def test_prompt_too_long_for_any_cut_is_too_long(tok):
    with pytest.raises(TooLong, match="no cut of the answer fits") as e:
        fit(tok, THREE, N_IMG + 5)
    assert e.value.reason == "too_long"


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_shipped_budgets_leave_the_text_room_after_the_image_tokens(stage):
    from launcher.config import load_config

    cfg = load_config(f"configs/train/{stage}.yaml")
    image_tokens = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    assert image_tokens == 576  # CLIP-L/336
    assert cfg.data.max_length - image_tokens >= 1024  # stage 1 dropped every sample at 512; stage 2 kept ~150 at 768
    assert cfg.data.max_length <= cfg.model.llm.max_position_embeddings
