"""Conversation -> token ids with the tokenizer's chat template: labels keep only the assistant's
tokens ({% generation %} spans, eos included), the one <image> id becomes num_image_tokens copies,
and prompt_ids is the prefix a generation at eval starts from. Too long: `fit_conversation` cuts the
answers at a phrase boundary (so every kept [SEG] keeps its mask); what cannot be cut is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datapipes.schema import IMAGE_TOKEN, P_END, P_START, SEG_TOKEN, BadSample

IGNORE_INDEX = -100


class TooLong(BadSample):
    def __init__(self, message: str):
        super().__init__("too_long", message)


@dataclass
class Tokens:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns
    prompt_ids: list[int]  # input_ids up to and including the last "ASSISTANT:" prefix


def image_token_id(tokenizer) -> int:
    """The id of <image>; the tokenizer must know it as one token (modeling adds it)."""
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer does not hold {IMAGE_TOKEN} as one token (got ids {ids}); add the special tokens first")
    return ids[0]


def tokenize_conversation(conversation: list[dict], tokenizer, *, image_id: int, num_image_tokens: int, max_length: int) -> Tokens:
    if "{% generation %}" in (tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, keep = list(enc["input_ids"]), list(enc["assistant_masks"])
    else:
        ids, keep = _assistant_mask_by_prefixes(conversation, tokenizer)
    if ids.count(image_id) != 1:
        raise BadSample("invalid", f"expected one {IMAGE_TOKEN} token after templating, found {ids.count(image_id)}")
    if not any(keep):
        raise BadSample("invalid", "the chat template marked no assistant tokens")
    # The last assistant turn starts where the last run of kept tokens starts.
    start = len(keep) - 1
    while start > 0 and keep[start - 1]:
        start -= 1
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]
    pos = ids.index(image_id)
    ids[pos : pos + 1] = [image_id] * num_image_tokens
    labels[pos : pos + 1] = [IGNORE_INDEX] * num_image_tokens
    start += num_image_tokens - 1 if pos < start else 0
    if len(ids) > max_length:
        raise TooLong(f"{len(ids)} tokens (with {num_image_tokens} image tokens) > max_length {max_length}")
    return Tokens(ids, labels, ids[:start])


# Where an answer may end when it is cut: after a [SEG], after a phrase without a mask (`</p>` not
# followed by a [SEG]), or after a sentence's end outside a phrase. Never inside `<p> ... </p>`,
# never between a phrase and its [SEG]: a kept [SEG] always has its phrase, and its mask stays.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def cut_points(answer: str) -> list[int]:
    """Character positions (ascending, excluding the full length) where `answer` may be cut."""
    points, depth, i = set(), 0, 0
    while i < len(answer):
        if answer.startswith(P_START, i):
            depth, i = depth + 1, i + len(P_START)
        elif answer.startswith(P_END, i):
            depth, i = max(depth - 1, 0), i + len(P_END)
            if depth == 0 and not answer[i:].lstrip().startswith(SEG_TOKEN):
                points.add(i)
        elif answer.startswith(SEG_TOKEN, i):
            i += len(SEG_TOKEN)
            if depth == 0:
                points.add(i)
        else:
            if depth == 0 and _SENTENCE_END.match(answer, i):
                points.add(i + 1)
            i += 1
    return sorted(p for p in points if 0 < p < len(answer.rstrip()))


def fit_conversation(conversation: list[dict], tokenizer, *, image_id: int, num_image_tokens: int,
                     max_length: int) -> tuple[Tokens, list[dict]]:
    """Tokens of `conversation`, cut when too long, and the conversation they stand for.

    The policy: keep the longest prefix that fits and ends at a cut point of an assistant turn
    (later turns dropped, the last kept answer shortened); masks of the [SEG]s cut away are the
    caller's to drop (they are the last ones, in order). Raises TooLong when not even the first
    answer's first cut point fits (the prompt and image alone are too long)."""
    kw = {"image_id": image_id, "num_image_tokens": num_image_tokens, "max_length": max_length}
    try:
        return tokenize_conversation(conversation, tokenizer, **kw), conversation
    except TooLong as e:
        full_error = e
    candidates = []  # shorter conversations, shortest first
    for t, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        ends = cut_points(turn["content"]) + ([len(turn["content"])] if t < len(conversation) - 1 else [])
        for end in ends:
            candidates.append([*conversation[:t], {"role": "assistant", "content": turn["content"][:end].rstrip()}])
    # Token counts grow with the kept text, so the longest prefix that fits is found by bisection.
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            best = (tokenize_conversation(candidates[mid], tokenizer, **kw), candidates[mid])
            lo = mid + 1
        except TooLong:
            hi = mid - 1
    if best is None:
        raise TooLong(f"{full_error}; no cut of the answer fits (the prompt and image tokens alone are too long)")
    return best


def _assistant_mask_by_prefixes(conversation: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """For an LLM's own chat template, which does not mark the assistant's turns: turn i's text is what
    rendering turns [:i+1] adds to rendering turns [:i] with the generation prompt; tokens starting in
    such a span are kept (a fast tokenizer's offsets)."""
    def render(turns: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    text = render(conversation, False)
    spans = []
    for i, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        before, upto = render(conversation[:i], True), render(conversation[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise BadSample("invalid", "the chat template does not render a conversation as a growing prefix; mark its assistant turns with {% generation %}")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    keep = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), keep
