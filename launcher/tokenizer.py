"""The tokenizer a run uses: the synthetic word-level one, or a local Hugging Face tokenizer.

Built by the launcher and handed to both datapipes and modeling (which never import each other).
"""

from __future__ import annotations

from modeling.config import LLMConfig


def make_tokenizer(cfg: LLMConfig):
    from datapipes.synthetic import VICUNA_V1_TEMPLATE, build_tokenizer

    if cfg.tokenizer == "synthetic":
        return build_tokenizer()
    from transformers import AutoTokenizer

    if cfg.tokenizer == "llm":
        if not cfg.path:
            raise ValueError("model.llm.tokenizer=llm needs model.llm.path")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(cfg.path, **kwargs)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    # Vicuna/Llama-2 tokenizers ship no chat template, and ours must mark the assistant's turns
    # ({% generation %}) for label masking, so the recipe's template always replaces theirs.
    tok.chat_template = VICUNA_V1_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok
