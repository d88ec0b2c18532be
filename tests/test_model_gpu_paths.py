"""What the first GPU run would meet, checked on the CPU: one dtype for every trainable tensor in bf16
(ZeRO-3's flat partitions need it), a build that refuses mixed dtypes by name, and flash-attention
chosen only when its extension really imports."""

import sys

import pytest
import torch

from modeling import build_model
from modeling.build import _check_one_trainable_dtype
from modeling.llm import attn_implementation
from test_model_fixtures import tiny_config, tiny_tokenizer


def test_bf16_lora_model_trains_only_bf16_tensors():
    cfg = tiny_config()
    cfg.dtype = "bfloat16"
    model = build_model(cfg, tiny_tokenizer())
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    assert lora, "the tiny config trains LoRA adapters"
    assert set(trainable.values()) == {torch.bfloat16}


def test_a_trainable_of_another_dtype_is_refused_naming_it():
    model = build_model(tiny_config(), tiny_tokenizer())
    model.vision.projector.float()
    model.vision.projector[0].weight.data = model.vision.projector[0].weight.data.double()
    with pytest.raises(TypeError, match=r"2 dtypes.*vision\.projector\.0\.weight"):
        _check_one_trainable_dtype(model)


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """A `flash_attn` package on sys.path whose import does what `body` says, on a machine that claims CUDA."""

    def make(body: str):
        pkg = tmp_path / "flash_attn"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    return make


def test_a_flash_attn_whose_extension_fails_to_load_falls_back_to_sdpa(fake_flash_attn, caplog):
    fake_flash_attn("raise ImportError('flash_attn_2_cuda: undefined symbol _ZN3c10')\n")
    with caplog.at_level("WARNING", logger="modeling.llm"):
        assert attn_implementation("auto") == "sdpa"
    assert "undefined symbol" in caplog.text


def test_a_flash_attn_that_imports_is_chosen_on_cuda(fake_flash_attn):
    fake_flash_attn("")
    assert attn_implementation("auto") == "flash_attention_2"


def test_an_explicit_attn_implementation_is_kept():
    assert attn_implementation("eager") == "eager"
