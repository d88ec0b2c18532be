"""Tiny inputs shared by the test_model_* files (importable by spawned ranks too): a word-level
tokenizer without the special tokens, the tiny ModelConfig, and batches with chosen [SEG] counts."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling.config import ModelConfig

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]
FIRST_WORD = 4  # ids below are unk/bos/eos/pad


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_config(**loss) -> ModelConfig:
    cfg = ModelConfig()
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    return cfg


def make_batch(model, seg_counts: list[int], length: int = 48, seed: int = 0) -> dict:
    """Random words after <s> + the image tokens; sample b has seg_counts[b] [SEG] tokens in its answer
    (the second half, which is labelled), a random mask each, and a few right-padded positions."""
    g = torch.Generator().manual_seed(seed)
    n_img, size = model.num_image_tokens, model.mask_size
    bsz = len(seg_counts)
    ids = torch.randint(FIRST_WORD, len(WORDS), (bsz, length), generator=g)
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = model.image_token_id
    answer_start = 1 + n_img + (length - 1 - n_img) // 2
    attention = torch.ones_like(ids)
    gt_masks = []
    for b, k in enumerate(seg_counts):
        pad = b % 3  # ragged lengths
        if pad:
            ids[b, -pad:] = model.pad_token_id
            attention[b, -pad:] = 0
        slots = torch.randperm(length - pad - answer_start, generator=g)[:k] + answer_start
        ids[b, slots] = model.seg_token_id
        gt_masks.append((torch.rand(k, size, size, generator=g) > 0.5).to(torch.uint8))
    labels = ids.clone()
    labels[:, :answer_start] = -100
    labels[attention == 0] = -100
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "clip_pixels": torch.randn(bsz, 3, model.cfg.vision.image_size, model.cfg.vision.image_size, generator=g),
        "sam_pixels": torch.randn(bsz, 3, size, size, generator=g),
        "gt_masks": gt_masks,
    }


def first_losses(model, batch: dict, keys: tuple[str, ...], steps: int = 3) -> list[list[float]]:
    """[loss, *terms[keys]] (rounded to 4 places) of `steps` AdamW steps (lr 1e-3) on one fixed batch:
    what the golden-loss tests record."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    got = []
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        got.append([round(v, 4) for v in (out.loss.item(), *(out.terms[k].item() for k in keys))])
    return got

def test_tiny_tokenizer_lacks_the_special_tokens():
    from modeling.llm import SPECIAL_TOKENS

    vocab = tiny_tokenizer().get_vocab()
    assert not any(t in vocab for t in SPECIAL_TOKENS)
