"""`python -m launcher count`: parameters and forward FLOPs per part, from the model's forward on fake weights. The tiny
counts equal those of the real built model; the 13B recipe counts without any weights on disk."""

import re

import pytest

from launcher.config import load_config
from launcher.count import count


def table(text: str) -> dict[str, tuple[int, int, float]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(.*?)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1).rstrip()] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")), float(m.group(4)))
    return rows


@pytest.mark.parametrize("kind", ["sam", "multigranular"])
def test_tiny_counts_match_the_built_model(kind):
    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    cfg = load_config("configs/train/tiny.yaml", [f"model.mask_decoder.kind={kind}"])
    rows = table(count(cfg))
    model = build_model(cfg.model, make_tokenizer(cfg.model.llm))
    assert rows["total"][:2] == (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.trainable_parameters()))
    assert rows["LLM (+ LoRA, new token rows)"][0] == sum(p.numel() for p in model.llm.parameters())
    assert rows["total"][2] > 0
    if kind == "multigranular":
        parts = [rows[k] for k in rows if k.startswith("  ")]
        assert sum(p[0] for p in parts) == rows["decoder (multigranular) + losses"][0] == sum(p.numel() for p in model.mg.parameters())
        assert rows["  pixel decoder (deformable encoder)"][2] > 0  # the deformable attention op is counted too


@pytest.mark.slow
def test_13b_recipe_counts_on_the_meta_device_without_weights():
    cfg = load_config("configs/train/stage2.yaml", ["model.mask_decoder.kind=multigranular"])
    rows = table(count(cfg))
    # Vicuna-13B 13,015,864,320 + 4 new rows in embed_tokens and lm_head + the trainable copies of those
    # rows + LoRA r=8 on q/v of 40 layers
    assert rows["LLM (+ LoRA, new token rows)"][0] == 13_015_864_320 + 2 * 40_960 + 40 * 2 * 2 * 8 * 5120
    assert 600e6 < rows["pixel encoder (SAM ViT)"][0] < 650e6 and rows["pixel encoder (SAM ViT)"][1] == 0
    assert 16_000 < rows["LLM (+ LoRA, new token rows)"][2] < 17_500  # ~2 x 13B x 640 tokens, in GFLOPs
    assert rows["  pixel decoder (deformable encoder)"][2] > 100
