"""Conversation -> token ids with the tokenizer's chat template: labels keep only the assistant's
tokens ({% generation %} spans, eos included), the one <image> id becomes num_image_tokens copies,
and prompt_ids is the prefix a generation at eval starts from. Too long is a bad sample, never cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from datapipes.schema import IMAGE_TOKEN, BadSample

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
    enc = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, keep = list(enc["input_ids"]), list(enc["assistant_masks"])
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
