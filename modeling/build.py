"""build_model: assemble LLM (+ special tokens, new-row training, LoRA), CLIP tower, SAM and the mask
decoder (modeling/mask_decoder.py) from a ModelConfig, and decide once what trains. Random weights are a function of cfg.init_seed only,
so frozen parts are rebuilt identically by every run and every rank instead of being checkpointed."""

from __future__ import annotations

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from modeling.config import ModelConfig
from modeling.llm import add_special_tokens, apply_lora, attach_new_token_rows, load_llm
from modeling.model import SegCapModel
from modeling.sam import SamSegmenter
from modeling.vision import VisionTower
from modeling.weights import load_init_from

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(cfg: ModelConfig, tokenizer, dschf=None) -> SegCapModel:
    """`dschf`: the caller's transformers HfDeepSpeedConfig for ZeRO-3, which must stay alive while this
    runs (transformers then builds every pretrained part under deepspeed.zero.Init). Adds the special
    tokens to `tokenizer` in place."""
    if dschf is not None and not is_deepspeed_zero3_enabled():
        raise ValueError("build_model got a dschf but transformers does not see ZeRO-3 enabled")
    dtype = DTYPES[cfg.dtype]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # Each part gets its own seed so resizing one part does not change another's random init.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.init_seed)
        llm = load_llm(cfg.llm, tokenizer, dtype)
        token_ids = add_special_tokens(tokenizer, llm)
        attach_new_token_rows(llm, list(token_ids.values()))
        if cfg.llm.train_mode == "lora":
            torch.manual_seed(cfg.init_seed + 1)
            llm = apply_lora(llm, cfg.llm.lora)
        elif cfg.llm.train_mode not in ("frozen", "full"):
            raise ValueError(f"model.llm.train_mode: {cfg.llm.train_mode!r} (lora | full | frozen)")
        torch.manual_seed(cfg.init_seed + 2)
        vision = VisionTower(cfg.vision, llm.config.hidden_size, dtype)
        torch.manual_seed(cfg.init_seed + 3)
        segmenter = SamSegmenter(cfg.pixel_encoder, cfg.mask_decoder, dtype)
        torch.manual_seed(cfg.init_seed + 4)
        model = SegCapModel(cfg, llm, vision, segmenter, tokenizer, token_ids)
    _set_trainable(model, cfg)
    _check_one_trainable_dtype(model)
    load_init_from(model, cfg)  # after _set_trainable: a segcap run's checkpoint holds trainable weights only
    return model


def _check_one_trainable_dtype(model: SegCapModel) -> None:
    """DeepSpeed flattens the trainables into one buffer per group (ZeRO-3: zero/utils.py defragment
    asserts one dtype); a part built in another dtype would fail there, far from its cause."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(name)
    if len(by_dtype) > 1:
        parts = "; ".join(f"{dt}: {len(names)} tensors, e.g. {names[0]}" for dt, names in by_dtype.items())
        raise TypeError(f"trainable parameters hold {len(by_dtype)} dtypes ({parts}); all must share model.dtype")


def _set_trainable(model: SegCapModel, cfg: ModelConfig) -> None:
    model.requires_grad_(False)
    model.vision.projector.requires_grad_(True)
    model.mask_decoder.set_trainable(cfg.mask_decoder.train)
    if cfg.llm.train_mode == "lora":
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        model.llm.get_input_embeddings().rows.requires_grad_(True)
        model.llm.get_output_embeddings().rows.requires_grad_(True)
    if cfg.llm.train_mode == "full":  # random-init tiny LLMs only: there is nothing to preserve
        model.llm.requires_grad_(True)
    if not cfg.vision.freeze:
        model.vision.clip.requires_grad_(True)
    if not cfg.pixel_encoder.freeze:
        model.segmenter.sam.vision_encoder.requires_grad_(True)
