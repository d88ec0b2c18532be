"""launcher/tokenizer.make_tokenizer: one tokenizer with the special tokens and the chat template
(Vicuna v1, Llama-2 chat, or the LLM's own), the same for the loader and the model."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from datapipes.schema import SPECIAL_TOKENS
from datapipes.synthetic import build_tokenizer
from datapipes.templates import LLAMA2_SYSTEM, VICUNA_V1_TEMPLATE
from datapipes.text import IGNORE_INDEX, image_token_id, tokenize_conversation
from launcher.tokenizer import make_tokenizer
from modeling import build_model
from modeling.config import LLMConfig
from test_model_fixtures import tiny_config

CONV = [
    {"role": "user", "content": "<image>\nPlease segment the red house."},
    {"role": "assistant", "content": "Sure, <p> the red house </p> [SEG]."},
    {"role": "user", "content": "And the tree?"},
    {"role": "assistant", "content": "It is [SEG]."},
]
CHATML = (  # SmolLM2-Instruct's own template (no {% generation %} marks)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def word_tokenizer(folder, template: str | None):
    """A fast word-level tokenizer saved as a Hugging Face folder, with an optional own chat template."""
    words = "<unk> <s> </s> <|im_start|> <|im_end|> system user assistant You are a helpful AI assistant".split()
    words += "[INST] [/INST] <<SYS>> <</SYS>> Please segment the red house Sure , . ? And tree It is".split()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)  # as in ChatML LLMs' tokenizers
    if template:
        fast.chat_template = template
    fast.save_pretrained(folder)
    return str(folder)


def labelled(tok, conv=CONV) -> list[str]:
    t = tokenize_conversation(conv, tok, image_id=image_token_id(tok), num_image_tokens=2, max_length=400)
    return tok.convert_ids_to_tokens([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE_INDEX])


def test_special_tokens_follow_the_vocabulary_and_vicuna_is_the_default_template():
    tok = make_tokenizer(LLMConfig())
    n = len(build_tokenizer())
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [n, n + 1, n + 2, n + 3]
    assert tok.chat_template == VICUNA_V1_TEMPLATE
    assert labelled(tok)[-5:] == ["It", "is", "[SEG]", ".", "</s>"]


def test_the_model_built_from_it_equals_one_that_adds_the_tokens_itself():
    cfg = tiny_config()
    cfg.llm.tokenizer = "synthetic"
    complete, bare = make_tokenizer(cfg.llm), build_tokenizer()
    a, b = build_model(cfg, complete), build_model(cfg, bare)
    assert a.token_ids == b.token_ids and len(complete) == len(bare)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_llama2_chat_renders_llava_llama2_prompts_and_labels_the_answers(tmp_path):
    cfg = LLMConfig(tokenizer=word_tokenizer(tmp_path, None), chat_template="llama2")
    tok = make_tokenizer(cfg)
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text == (
        f"<s>[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n<image>\nPlease segment the red house. [/INST] "
        "Sure, <p> the red house </p> [SEG]. </s><s>[INST] And the tree? [/INST] It is [SEG]. </s>"
    )
    assert tok.apply_chat_template(CONV[:3], tokenize=False, add_generation_prompt=True).endswith("And the tree? [/INST]")
    assert labelled(tok) == ["Sure", ",", "<p>", "the", "red", "house", "</p>", "[SEG]", ".", "</s>", "It", "is", "[SEG]", ".", "</s>"]


def test_the_llms_own_template_without_generation_marks_labels_its_assistant_turns(tmp_path):
    cfg = LLMConfig(tokenizer=word_tokenizer(tmp_path, CHATML), chat_template="llm")
    tok = make_tokenizer(cfg)
    assert tok.chat_template == CHATML
    # each assistant turn: its words and the template's own end of turn ("<|im_end|>", then a newline)
    assert labelled(tok) == ["Sure", ",", "<p>", "the", "red", "house", "</p>", "[SEG]", ".", "<|im_end|>",
                             "It", "is", "[SEG]", ".", "<|im_end|>"]


def test_the_llm_template_choice_needs_a_template(tmp_path):
    cfg = LLMConfig(tokenizer=word_tokenizer(tmp_path, None), chat_template="llm")
    with pytest.raises(ValueError, match=r"model.llm.chat_template=llm: .* has no chat_template"):
        make_tokenizer(cfg)
