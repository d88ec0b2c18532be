"""The language model: load LlamaForCausalLM (one path for every scale), add the special tokens, train
only their rows of embed_tokens/lm_head, and attach LoRA. Works under ZeRO-3 when the caller keeps a
transformers `HfDeepSpeedConfig` alive while this runs (the model is then partitioned as it loads)."""

from __future__ import annotations

import importlib.util
import logging

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modeling.config import LLMConfig, LoRAConfig

logger = logging.getLogger(__name__)

# Same literals as datapipes/schema.py (modeling does not import datapipes; a test checks they agree).
IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
P_START = "<p>"
P_END = "</p>"
SPECIAL_TOKENS = (IMAGE_TOKEN, SEG_TOKEN, P_START, P_END)


def attn_implementation(requested: str) -> str:
    """auto: flash-attention 2 on CUDA when its extension imports, else SDPA.

    `find_spec` alone is not enough: a flash_attn package whose CUDA extension was built for another
    torch is found but fails on import, and the first forward would die. Importing it tells.
    """
    if requested != "auto":
        return requested
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    try:
        importlib.import_module("flash_attn")
    except Exception as e:  # an ImportError or an undefined-symbol OSError from a mismatched build
        logger.warning("flash_attn is installed but does not load (%s: %s); using SDPA", type(e).__name__, e)
        return "sdpa"
    return "flash_attention_2"


def load_llm(cfg: LLMConfig, tokenizer, dtype: torch.dtype) -> LlamaForCausalLM:
    """`from_pretrained(path[, gguf_file])` when cfg.path is set, else a random Llama of cfg's size.

    Both go through transformers' loaders, which build under deepspeed.zero.Init when ZeRO-3 is on.
    Random init draws from the global RNG: the caller seeds it (build_model uses cfg.init_seed).
    """
    attn = attn_implementation(cfg.attn_implementation)
    if cfg.path:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        llm = LlamaForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn, **kwargs)
    else:
        config = LlamaConfig(
            vocab_size=vocab_before_special_tokens(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    llm.config.use_cache = False  # training default; generate() turns the cache on for itself
    if cfg.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llm


def vocab_before_special_tokens(tokenizer) -> int:
    """The tokenizer's vocabulary without segcap's additions (launcher/tokenizer.py adds them at the end):
    the rows a pretrained LLM brings, and the size of a random one (whose new rows then start like a
    pretrained one's)."""
    vocab = tokenizer.get_vocab()
    return min([vocab[t] for t in SPECIAL_TOKENS if t in vocab] + [len(tokenizer)])


def add_special_tokens(tokenizer, model: LlamaForCausalLM) -> dict[str, int]:
    """Give the four tokens rows: add those the tokenizer lacks (launcher/tokenizer.py has added them
    already; other callers may not have), grow the embeddings to len(tokenizer), and set every row past
    the LLM's own (ids >= its old row count) in embed_tokens/lm_head to the mean of the old rows. Rows
the LLM already has for them (an exported segcap model) are kept.

    resize_token_embeddings gathers ZeRO-3 parameters by itself (an outer GatheredParameters would
    overlap it and raise), so the new rows are written in a second, separate gather.
    """
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in SPECIAL_TOKENS if t not in vocab], special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    old_len = model.get_input_embeddings().num_embeddings
    new_ids = sorted(i for i in ids.values() if i >= old_len)
    if new_ids != list(range(old_len, old_len + len(new_ids))):
        raise RuntimeError(f"special token ids {ids} do not follow the LLM's {old_len} rows (tokenizer length {len(tokenizer)})")

    if len(tokenizer) > old_len:
        # mean_resizing=False: its covariance sampling is wasted work, the rows are overwritten below.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_ids:
        weights = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings().weight
        if head is not weights[0]:  # untied (Vicuna); SmolLM2 ties them, one matrix
            weights.append(head)
        with deepspeed.zero.GatheredParameters(weights, modifier_rank=0), torch.no_grad():
            for w in weights:
                w[new_ids] = w[:old_len].mean(0, keepdim=True)
    return ids


class EmbeddingWithNewRows(nn.Module):
    """embed_tokens whose special-token rows come from a small trainable `rows` parameter.

    The full matrix (`base`) stays frozen. Every forward uses `rows` (torch.where), so it gets a
    gradient on every rank every step, as ZeRO-3 needs.
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int], rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.rows = rows
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        slot[token_ids] = torch.arange(len(token_ids))
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim

    @property
    def weight(self) -> nn.Parameter:  # what HF/peft helpers read from get_input_embeddings()
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        slot = self.slot[input_ids]
        new = F.embedding(slot.clamp(min=0), self.rows).to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, out)


class HeadWithNewRows(nn.Module):
    """lm_head whose logits for the special tokens come from `rows` (shared with the embedding when tied)."""

    def __init__(self, base: nn.Linear, token_ids: list[int], rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.rows = rows
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        new = F.linear(hidden, self.rows.to(hidden.dtype)).to(logits.dtype)
        return logits.index_copy(-1, self.token_ids, new)


def attach_new_token_rows(model: LlamaForCausalLM, token_ids: list[int]) -> None:
    """Swap embed_tokens/lm_head for the wrappers above, `rows` initialised from the current rows.

    Why not peft's trainable_token_indices: under ZeRO-3 it takes a CUDA-only branch and fails on CPU.
    The new `rows` are plain parameters here; deepspeed.initialize partitions them like the rest.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    weights = [emb.weight] if tied else [emb.weight, head.weight]
    with deepspeed.zero.GatheredParameters(weights):
        emb_rows = nn.Parameter(emb.weight[token_ids].detach().clone())
        head_rows = emb_rows if tied else nn.Parameter(head.weight[token_ids].detach().clone())
    model.set_input_embeddings(EmbeddingWithNewRows(emb, token_ids, emb_rows))
    model.set_output_embeddings(HeadWithNewRows(head, token_ids, head_rows))


def merge_new_token_rows(model: LlamaForCausalLM) -> None:
    """Write the trained rows back into the full matrices and restore plain embed_tokens/lm_head
    (for export: the result is an ordinary LlamaForCausalLM). Safe under ZeRO-3."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, EmbeddingWithNewRows):
        return
    pairs = [(emb.base.weight, emb.rows, emb.token_ids)]
    if head.base.weight is not emb.base.weight:
        pairs.append((head.base.weight, head.rows, head.token_ids))
    params = [p for w, r, _ in pairs for p in (w, r)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for weight, rows, ids in pairs:
            weight[ids] = rows.to(weight.dtype)
    model.set_input_embeddings(emb.base)
    model.set_output_embeddings(head.base)


def apply_lora(model: LlamaForCausalLM, cfg: LoRAConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # peft makes adapters in fp32 (autocast_adapter_dtype, and under zero.Init it cannot read the base
    # weight's dtype); DeepSpeed does not cast a zero.Init model back, and its flat partitions need one
    # dtype for all trainables (zero/utils.py defragment). The adapters are plain tensors: cast them here.
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    dtype = model.get_input_embeddings().base.weight.dtype
    for name, p in peft_model.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return peft_model
