"""`launcher plan`: preflight of the shipped configs against small real shards and model folders, model
states equal to DeepSpeed's own estimators, the fake-tensor activation estimate against a real CPU run,
and the ZeRO-2 / ZeRO-3 / ZeRO++ choices rendered into DeepSpeed's JSON."""

import json
import os
import shutil
from argparse import Namespace
from pathlib import Path

import pytest

from datapipes.config import SyntheticConfig
from datapipes.synthetic import build_tokenizer, write_synthetic
from launcher.config import ConfigError, load_config
from launcher.dist import DistInfo
from launcher.engine import render_ds_config
from launcher.plan import ParamCounts, model_states, param_counts
from launcher.preflight import preflight

STAGE1_SOURCES = ("llava_pretrain", "refcoco_val")
STAGE2_SOURCES = ("semantic_seg", "refer_seg", "coco_caption", "llava_instruct_150k", "grandf", "mgscdata", "refcoco_val")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """24 synthetic train samples in 3 shards (~620 tokens each with 576 image tokens)."""
    out = tmp_path_factory.mktemp("synthetic")
    train, _ = write_synthetic(SyntheticConfig(out_dir=str(out), num_train=24, num_val=8, samples_per_shard=8))
    return Path(train)


@pytest.fixture
def roots(tmp_path, synthetic, monkeypatch) -> Path:
    """SEGCAP_DATA_ROOT with every shipped source as a copy of the synthetic shards, and SEGCAP_MODEL_ROOT
    with the three model folders (config + weight index or file; the LLM folder holds a tokenizer)."""
    data = tmp_path / "data"
    for name in set(STAGE1_SOURCES + STAGE2_SOURCES):
        shutil.copytree(synthetic, data / "shards" / name)
    models = tmp_path / "models"
    llm = models / "vicuna-13b-v1.5"
    build_tokenizer().save_pretrained(llm)
    (llm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (llm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for s in shards:
        (llm / s).write_bytes(b"")
    for name in ("clip-vit-large-patch14-336", "sam-vit-huge"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
        (models / name / "model.safetensors").write_bytes(b"")
    (models / "sam_vit_h_4b8939.pth").write_bytes(b"")  # model.init_from of the 13B configs
    (tmp_path / "runs" / "stage1").mkdir(parents=True)  # stage 2 takes the projector of stage 1's run
    monkeypatch.setenv("SEGCAP_DATA_ROOT", str(data))
    monkeypatch.setenv("SEGCAP_MODEL_ROOT", str(models))
    monkeypatch.setenv("SEGCAP_RUN_ROOT", str(tmp_path / "runs"))
    return tmp_path


def by_level(findings, level: str) -> dict[str, str]:
    return {f.what: f.message for f in findings if f.level == level}


# ------------------------------------------------------------------------------------------ preflight
def test_stage1_preflight_finds_every_sample_dropped_at_a_max_length_below_the_image_tokens(roots):
    """Stage 1 as first shipped (max_length 512): 576 image tokens alone exceed it; no cut can help."""
    errors = by_level(preflight(load_config("configs/train/stage1.yaml", ["data.max_length=512"]), world_size=8), "error")
    assert sorted(errors) == ["data.train[0] llava_pretrain", "data.val[0] refcoco_val"]
    assert "0% exceed data.max_length 512 and would be cut, 100% dropped" in errors["data.train[0] llava_pretrain"]
    assert "DataError" in errors["data.train[0] llava_pretrain"]


def test_shipped_stage1_preflight_passes(roots):
    stats = {}
    assert by_level(preflight(load_config("configs/train/stage1.yaml"), world_size=1, stats=stats), "error") == {}
    assert 576 < stats["data.train[0] llava_pretrain"]["median"] < 2048


def test_stage2_preflight_passes_lengths_and_warns_of_too_few_shards(roots):
    findings = preflight(load_config("configs/train/stage2.yaml"), world_size=2)
    assert by_level(findings, "error") == {}
    warnings = by_level(findings, "warning")
    # 3 shards for 2 ranks x 4 workers: every train source, no val source (eval reads differently)
    assert sorted(warnings) == sorted(f"data.train[{i}] {s.name}" for i, s in enumerate(load_config("configs/train/stage2.yaml").data.train))
    assert all("3 shard(s) for 8 reader slots" in m for m in warnings.values())


def test_preflight_counts_samples_that_a_shorter_max_length_would_cut(roots):
    """Answers over max_length are cut at a phrase boundary by the loader: a warning with the shares
    (the synthetic samples hold 633 tokens at the median, 658 at most)."""
    stats = {}
    found = preflight(load_config("configs/train/stage2.yaml", ["data.max_length=640"]), world_size=1, stats=stats)
    s = stats["data.train[1] refer_seg"]
    assert 0 < s["cut"] < 1 and s["dropped"] == 0 and s["median"] < 640 < s["max"]
    assert by_level(found, "error") == {}
    msg = by_level(found, "warning")["data.train[1] refer_seg"]
    assert f"{s['cut']:.0%} exceed data.max_length 640 and would be cut, 0% dropped" in msg


def test_preflight_names_a_missing_shard(roots):
    folder = roots / "data" / "shards" / "refer_seg"
    (folder / "shard-000001.tar").unlink()
    errors = by_level(preflight(load_config("configs/train/stage2.yaml"), world_size=1), "error")
    assert list(errors) == ["data.train[1] refer_seg"] and "shard-000001.tar" in errors["data.train[1] refer_seg"]


def test_preflight_names_a_missing_weight_file_and_a_broken_tokenizer(roots):
    llm = roots / "models" / "vicuna-13b-v1.5"
    (llm / "model-00002-of-00002.safetensors").unlink()
    (llm / "tokenizer.json").write_text("{not json")
    errors = by_level(preflight(load_config("configs/train/stage2.yaml"), world_size=1), "error")
    assert "model-00002-of-00002.safetensors" in errors["model.llm.path"]
    assert "does not load" in errors["model.llm.tokenizer"]


def test_preflight_names_a_missing_init_from_source(roots):
    shutil.rmtree(roots / "runs" / "stage1")
    errors = by_level(preflight(load_config("configs/train/stage2.yaml"), world_size=1), "error")
    assert list(errors) == ["model.init_from[1].path"] and "stage1 does not exist" in errors["model.init_from[1].path"]


def test_preflight_says_a_resume_at_another_world_size_loads_the_consolidated_state(roots):
    from launcher.checkpoint import MARKER, tag_for

    cfg = load_config("configs/train/demo.yaml", [f"train.output_dir={roots / 'run'}"])
    ckpt = roots / "run" / "checkpoints" / tag_for(3)
    ckpt.mkdir(parents=True)
    (ckpt / MARKER).write_text(json.dumps({"step": 3, "world_size": 2}))
    found = preflight(cfg, world_size=4)
    assert "train.output_dir" not in by_level(found, "error")
    note = by_level(found, "warning")["train.output_dir"]
    assert "written by 2 ranks, on 4" in note and "consolidated trainable state" in note
    assert "train.output_dir" not in by_level(preflight(cfg, world_size=2), "warning")


# ------------------------------------------------------------------------------------- model states
@pytest.mark.parametrize("gpus,per_node", [(8, 8), (16, 8), (64, 8)])
def test_all_trainable_model_states_equal_deepspeeds_estimators(gpus, per_node):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        model_to_params,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
    )

    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    cfg = load_config("configs/train/tiny.yaml")
    model = build_model(cfg.model, make_tokenizer(cfg.model.llm)).requires_grad_(True)
    total, largest = model_to_params(model)
    pc = param_counts(model, bytes_per_weight=2)
    nodes = gpus // per_node
    _, z2 = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=False, cpu_offload_params=False)
    assert sum(model_states(pc, "zero2", gpus, per_node).values()) == pytest.approx(z2, abs=1)
    assert sum(model_states(pc, "zero3", gpus, per_node).values()) == pytest.approx(z3, abs=1)


def test_lora_model_states_count_frozen_weights_apart():
    """13B-like split: 13 B frozen bf16 weights, 70 M trainable; 8 GPUs on one node."""
    pc = ParamCounts(frozen=13_000_000_000, trainable=70_000_000, largest_layer=164_000_000, largest_layer_trainable=0, bytes_per_weight=2)
    z2, z3, zpp = (model_states(pc, s, 8, 8) for s in ("zero2", "zero3", "zero3++"))
    assert z2["frozen_weights"] == 26e9 and z2["trainable_weights"] == 140e6  # replicated
    assert z2["gradients"] == 6 * 70e6 / 8 and z2["optimizer"] == 12 * 70e6 / 8
    assert z3["frozen_weights"] == 26e9 / 8 and z3["gathered"] == 2 * 164e6  # frozen: no gradient to gather
    assert zpp["secondary_weights"] == 2 * (13e9 + 70e6) / 8


# ------------------------------------------------------------------------------------- activations
def test_fake_activation_estimate_is_within_20_percent_of_a_real_cpu_run():
    """Live bytes of the fake forward + backward against the CPU profiler's memory events of the real
    model (peak less what stays allocated at the end, i.e. the gradients), same batch shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.profiler import ProfilerActivity, profile

    from launcher.fake_model import build_fake, profile_step, sample_batch
    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    cfg = load_config("configs/train/tiny.yaml")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = profile_step(build_fake(cfg, mode), mode, batch_size=4, seq_len=80)

    model = build_model(cfg.model, make_tokenizer(cfg.model.llm)).train()
    batch = sample_batch(model, None, batch_size=4, seq_len=80)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(**batch)
        out.loss.backward()
        del out
    # Allocations are charged to the operator that made them (self), frees outside one to [memory].
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.end)
    now = peak = 0
    for e in events:
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    real = peak - now
    print(f"activations: fake {fake.activation_bytes:,} B, real {real:,} B")
    assert real > 1e6
    assert fake.activation_bytes == pytest.approx(real, rel=0.2)


# ------------------------------------------------------------------------------------- DeepSpeed JSON
def rendered(*overrides: str) -> dict:
    cfg = load_config("configs/train/tiny.yaml", list(overrides))
    return render_ds_config(cfg, DistInfo(0, 0, 2, "gloo", "torchrun"))["zero_optimization"]


def test_zero_stage_2_renders_stage_2_without_zeropp():
    z = rendered("train.zero_stage=2")
    assert z["stage"] == 2 and z["zero_hpz_partition_size"] == 1
    assert z["zero_quantized_weights"] is False and z["zero_quantized_gradients"] is False


def test_zeropp_options_render_for_stage_3():
    z = rendered("train.zero_stage=3", "train.zero3_hpz_partition_size=8", "train.zero3_quantized_weights=true",
                 "train.zero3_quantized_gradients=true")
    assert (z["stage"], z["zero_hpz_partition_size"], z["zero_quantized_weights"], z["zero_quantized_gradients"]) == (3, 8, True, True)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    parsed = DeepSpeedZeroConfig(**z)  # DeepSpeed's own schema accepts what we render
    assert parsed.zero_hpz_partition_size == 8 and parsed.zero_quantized_weights and parsed.zero_quantized_gradients


@pytest.mark.parametrize("key", ["train.zero3_hpz_partition_size=8", "train.zero3_quantized_weights=true", "train.zero3_quantized_gradients=true"])
def test_zeropp_options_with_stage_2_are_a_config_error(key):
    with pytest.raises(ConfigError, match="ZeRO\\+\\+ needs train.zero_stage=3"):
        load_config("configs/train/tiny.yaml", ["train.zero_stage=2", key])


# ------------------------------------------------------------------------------------- the verb
def test_plan_verb_writes_a_recommendation_that_fits_and_exits_nonzero_on_a_preflight_error(tmp_path, roots):
    from launcher.plan import main

    args = Namespace(gpu="a100-40g", gpus=16, gpus_per_node=8, inter_node_gbps=None, seq_len=None, global_batch=None,
                     json=str(tmp_path / "plan.json"), no_preflight=False)
    out = tmp_path / "run"
    cfg = load_config("configs/train/tiny.yaml", [f"train.output_dir={out}", "data.max_length=600"])
    cfg.data.train[0].path = str(roots / "data" / "shards" / "refer_seg")
    cfg.data.val[0].path = str(roots / "data" / "shards" / "refcoco_val")
    # the tiny model has 16 image tokens, so the 576-token-image synthetic shards are far below 600
    assert main(cfg, args) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {o["stage"] for o in plan["options"]} == {"zero2", "zero3", "zero3++"}
    rec = plan["recommendation"]
    assert rec["fits"] and rec["memory_gib"]["total"] <= plan["assumptions"]["usable_gib"]
    assert rec["micro_batch"] * rec["accumulation"] * 16 == plan["global_batch"]
    os.remove(tmp_path / "plan.json")
    cfg.data.max_length = 40
    assert main(cfg, args) == 1  # more samples over max_length than max_bad_fraction allows: an error
