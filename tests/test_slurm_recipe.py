"""The two-stage recipe rehearsed through sbatch on the 2-node test cluster, as README's commands run it:
slurm/stage1.sh then slurm/stage2.sh with the shipped stage1/stage2 configs, then slurm/eval.sh at another
world size, then export and infer. Only model paths and sizes, data roots and the run length are
overridden: the model folder holds tiny real-format files under the recipe's names (a Llama folder for
vicuna-13b-v1.5, a CLIPVisionModel folder, a segment-anything .pth), the data root synthetic shards under
every shard name the data configs use. CPU: fp32 instead of bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 3
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0"]
ONE_TASK = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0"]


def _tiny_sizes() -> list[str]:
    """The tiny model's sizes as overrides of mglmm13b (its size fields describe the files)."""
    from modeling.config import ModelConfig

    cfg = ModelConfig()
    out = []
    for section, keys in (
        ("vision", ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")),
        ("pixel_encoder", ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                           "output_channels", "window_size", "global_attn_indexes")),
        ("mask_decoder", ("num_layers", "num_heads", "mlp_dim")),
    ):
        for k in keys:
            v = getattr(getattr(cfg, section), k)
            out.append(f"model.{section}.{k}={list(v) if isinstance(v, list) else v}")
    return out + ["model.dtype=float32", "train.precision=fp32"]


def _common() -> list[str]:
    return [*_tiny_sizes(), "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=1",
            f"train.steps={STEPS}", f"train.save_every={STEPS}", "train.log_every=1", "train.eval_every=0",
            "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """$SEGCAP_MODEL_ROOT and $SEGCAP_DATA_ROOT as README lays them out, at tiny sizes."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import build_tokenizer, write_synthetic
    from launcher.config import load_config
    from modeling.config import ModelConfig
    from weights_fixtures import clip_config, llama_config, write_sam_pth

    root = tmp_path_factory.mktemp("recipe")
    models, data = root / "models", root / "data"
    cfg = ModelConfig()
    tok = build_tokenizer()
    tok.save_pretrained(models / "vicuna-13b-v1.5")
    LlamaForCausalLM(llama_config(cfg, len(tok))).save_pretrained(models / "vicuna-13b-v1.5")
    CLIPVisionModel(clip_config(cfg)).save_pretrained(models / "clip-vit-large-patch14-336")
    write_sam_pth(models / "sam_vit_h_4b8939.pth", cfg)
    synth = root / "synthetic"
    write_synthetic(SyntheticConfig(out_dir=str(synth), num_train=64, num_val=8, samples_per_shard=32))
    env = {"SEGCAP_MODEL_ROOT": str(models), "SEGCAP_DATA_ROOT": str(data), "SEGCAP_RUN_ROOT": str(root / "runs")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for stage in ("stage1", "stage2"):
            run = load_config(f"configs/train/{stage}.yaml")
            for src in run.data.train + run.data.val:
                link = Path(src.path)
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(synth / ("val" if src in run.data.val else "train"))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root, env


def _projector(ckpt: Path):
    from safetensors.torch import load_file

    w = load_file(str(ckpt / "trainable" / "model.safetensors"))
    return {k: v for k, v in w.items() if k.startswith("vision.projector.")}, w


@pytest.mark.timeout(1500)
def test_recipe_stage1_stage2_eval_export_infer(slurm_2node, roots):
    import torch

    root, env = roots
    runs = root / "runs"
    # stage 1: two nodes, one rank each
    job1 = slurm_2node.submit(REPO / "slurm/stage1.sh", _common(), TWO_NODES, env={**env, "SEGCAP_RUN_NAME": "stage1"})
    info = slurm_2node.wait(job1, "COMPLETED", timeout=400)
    assert info["ExitCode"] == "0:0", slurm_2node.report(job1)
    ckpt1 = runs / "stage1" / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt1 / "COMPLETE").is_file()

    # stage 2 starts from runs/stage1 (configs/train/stage2.yaml's init_from). Its projector's learning rate
    # is 0 here, so the checkpoint shows the projector stage 2 began with; everything else trains.
    job2 = slurm_2node.submit(REPO / "slurm/stage2.sh", [*_common(), "optim.lr_mult.vision=0"], TWO_NODES,
                              env={**env, "SEGCAP_RUN_NAME": "stage2"})
    info = slurm_2node.wait(job2, "COMPLETED", timeout=400)
    assert info["ExitCode"] == "0:0", slurm_2node.report(job2)
    run2 = runs / "stage2"
    ckpt2 = run2 / "checkpoints" / f"step_{STEPS:08d}"
    p1, _ = _projector(ckpt1)
    p2, w2 = _projector(ckpt2)
    assert sorted(p1) == sorted(p2) and p1
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k  # bit-equal: stage 1's projector
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in w2.items())  # LoRA trained (B starts at 0)
    at_end = json.loads((run2 / f"eval_val_step{STEPS:08d}.json").read_text())

    # eval.sh at another world size (1 rank; stage 2 wrote its checkpoint with 2)
    job3 = slurm_2node.submit(REPO / "slurm/eval.sh", _common(), ONE_TASK, env={**env, "SEGCAP_RUN_DIR": str(run2)})
    info = slurm_2node.wait(job3, "COMPLETED", timeout=400)
    assert info["ExitCode"] == "0:0", slurm_2node.report(job3)
    assert "was written by 2 ranks, this run has 1: loading its consolidated trainable state" in slurm_2node.output(job3)
    assert any(k.endswith("cIoU") for k in at_end)
    again = json.loads((run2 / f"eval_eval_step{STEPS:08d}.json").read_text())
    assert {k.split("/", 1)[1]: v for k, v in again.items()} == pytest.approx(
        {k.split("/", 1)[1]: v for k, v in at_end.items()}, abs=1e-6)

    # export (stage 1's run dir is not needed: it gave only the projector, which the checkpoint holds)
    penv = {**os.environ, **env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = root / "export"
    res = subprocess.run([sys.executable, "-m", "launcher", "export", "--run", str(run2), "--out", str(out)],
                         cwd=REPO, env=penv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    image = next((root / "synthetic" / "val").glob("*.tar"))
    import tarfile

    with tarfile.open(image) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".png"))
        (root / "photo.png").write_bytes(tf.extractfile(member).read())
    res = subprocess.run([sys.executable, "-m", "launcher", "infer", "--model", str(out), "--image", str(root / "photo.png"),
                          "--prompt", "Please segment the red circle.", "--out", str(root / "answers"), "--max-new-tokens", "8"],
                         cwd=REPO, env=penv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads((root / "answers" / "photo.json").read_text())
    assert result["answer"] and len(result["masks"]) == result["answer"].count("[SEG]")
    assert (root / "answers" / "photo.png").is_file()
