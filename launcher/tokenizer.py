"""The tokenizer of a run, complete: the LLM's (or the synthetic word-level one) with segcap's special
tokens added (ids len(vocab) + i, in SPECIAL_TOKENS order) and the configured chat template. Built once
by the launcher and handed to the loader, the model, evaluation and inference alike."""

from __future__ import annotations

from datapipes.schema import SPECIAL_TOKENS
from datapipes.templates import TEMPLATES
from modeling.config import LLMConfig


def make_tokenizer(cfg: LLMConfig):
    tok = _base_tokenizer(cfg)
    vocab = tok.get_vocab()
    tok.add_tokens([t for t in SPECIAL_TOKENS if t not in vocab], special_tokens=True)
    if cfg.chat_template == "llm":
        # The LLM's own template; datapipes/text.py finds the assistant's turns by rendering prefixes
        # when the template does not mark them with {% generation %}.
        if not tok.chat_template:
            where = cfg.path if cfg.tokenizer == "llm" else cfg.tokenizer
            raise ValueError(f"model.llm.chat_template=llm: the tokenizer of {where} has no chat_template; choose one of {sorted(TEMPLATES)}")
    else:
        # Vicuna/Llama-2 tokenizers ship none, and ours must mark the assistant's turns for the labels.
        tok.chat_template = TEMPLATES[cfg.chat_template]
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _base_tokenizer(cfg: LLMConfig):
    if cfg.tokenizer == "synthetic":
        from datapipes.synthetic import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    if cfg.tokenizer == "llm":
        if not cfg.path:
            raise ValueError("model.llm.tokenizer=llm needs model.llm.path")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        return AutoTokenizer.from_pretrained(cfg.path, **kwargs)
    return AutoTokenizer.from_pretrained(cfg.tokenizer)
