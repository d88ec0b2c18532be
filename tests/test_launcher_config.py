"""Config composition and validation: errors name the key and the valid choices."""

import json

import pytest

from launcher.config import ConfigError, load_config
from launcher.dist import DistInfo
from launcher.engine import lr_lambda, render_ds_config

TINY = "configs/train/tiny.yaml"


def test_overrides_reach_typed_fields():
    cfg = load_config(TINY, ["train.steps=7", "model.llm.num_layers=3", "optim.lr=0.5"])
    assert (cfg.train.steps, cfg.model.llm.num_layers, cfg.optim.lr) == (7, 3, 0.5)
    assert isinstance(cfg.model.llm.num_layers, int)


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.stepz=3"])
    msg = str(e.value)
    assert "'train.stepz'" in msg and "'steps'" in msg and "'grad_accum'" in msg


def test_unknown_nested_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {model: tiny, data: synthetic}\nmodel:\n  llm:\n    hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"model\.llm\.hiden_size.*hidden_size"):
        load_config(bad)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"model\.llm\.hidden_size"):
        load_config(TINY, ["model.llm.hidden_size=wide"])


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"train\.precision='fp8'.*\['fp32', 'bf16', 'fp16'\]"):
        load_config(TINY, ["train.precision=fp8"])


def test_group_choice_lists_available_files():
    with pytest.raises(ConfigError, match=r"model='huge'.*'mglmm13b'.*'tiny'"):
        load_config(TINY, ["model=huge"])


def test_group_override_swaps_the_model():
    cfg = load_config(TINY, ["model=mglmm13b"])
    assert cfg.model.name == "mglmm13b" and cfg.model.llm.path.endswith("vicuna-13b-v1.5")
    assert cfg.model.pixel_encoder.image_size == 1024 and cfg.model.vision.patch_size == 14


def test_non_positive_values_rejected():
    with pytest.raises(ConfigError, match=r"data\.batch_size=0 must be > 0"):
        load_config(TINY, ["data.batch_size=0"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_train_config_validates():
    for name in ("demo", "tiny", "stage1", "stage2", "stage2_from_llava"):
        cfg = load_config(f"configs/train/{name}.yaml")
        assert cfg.train.steps > 0


def test_deepspeed_json_rendered_from_train_config():
    cfg = load_config(TINY, ["data.batch_size=4", "train.grad_accum=3", "optim.lr=0.002", "train.precision=bf16"])
    ds = render_ds_config(cfg, DistInfo(0, 0, 2, "gloo", "torchrun"))
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == 0.002 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(ds)


def test_lr_schedule_warmup_then_cosine_floor():
    cfg = load_config(TINY, ["train.steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.1)


def _named_module():
    import torch

    m = torch.nn.Module()
    m.llm = torch.nn.Linear(2, 2)
    m.segmenter = torch.nn.Module()
    m.segmenter.encoder = torch.nn.Linear(2, 2)
    m.segmenter.decoder = torch.nn.Linear(2, 2)
    m.segmenter_extra = torch.nn.Linear(2, 2)  # shares the prefix string, not the module path
    m.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    return m


def test_lr_mult_groups_by_longest_module_prefix(tmp_path):
    from launcher.engine import param_groups

    cfg_file = tmp_path / "mult.yaml"
    cfg_file.write_text(
        "defaults: {model: tiny, data: synthetic}\n"
        "optim: {lr: 0.01, lr_mult: {segmenter: 3.0, 'segmenter.decoder': 5.0}}\n"
    )
    cfg = load_config(cfg_file)
    m = _named_module()
    groups = param_groups(m, cfg)
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in groups}
    ids = lambda mod: {id(p) for p in mod.parameters()}  # noqa: E731
    assert by_lr == {
        0.01: ids(m.llm) | ids(m.segmenter_extra),
        0.03: ids(m.segmenter.encoder),
        0.05: ids(m.segmenter.decoder),
    }
    # without multipliers: the plain list of trainable parameters, frozen ones left out
    plain = param_groups(m, load_config(TINY))
    assert [id(p) for p in plain] == [id(p) for n, p in m.named_parameters() if not n.startswith("frozen")]


def test_lr_mult_prefix_matching_nothing_names_the_modules():
    from launcher.engine import param_groups

    cfg = load_config(TINY, ["optim.lr_mult.segmentr=2"])
    with pytest.raises(ValueError, match=r"'segmentr' matches no trainable parameter.*\['llm', 'segmenter', 'segmenter_extra'\]"):
        param_groups(_named_module(), cfg)
