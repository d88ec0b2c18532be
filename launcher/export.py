"""`python -m launcher export`: one checkpoint step -> a self-contained Hugging Face-style folder, and
`load_export` to build a SegCapModel back from it (inference, tests). Frozen weights are not in the
checkpoints: they come from the model folders the run's config names (or its init_seed when random).

Folder layout:
    llm/        LlamaForCausalLM (LoRA merged unless --lora-only, new-token rows in place; sharded
                safetensors) + the tokenizer with its special tokens and chat template
    adapter/    --lora-only: the LoRA adapter in peft's format (llm/ then holds the base LLM)
    vision/     CLIPVisionModel          sam/   SamModel (encoder + the trained mask decoder)
    heads.safetensors   the projector and the [SEG] MLP (or the multi-granularity decoder)
    segcap.yaml         the model config (paths relative to the folder) and where it came from
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from launcher import checkpoint
from launcher.config import load_config
from modeling.config import ModelConfig

CONFIG_FILE = "segcap.yaml"
HEADS_FILE = "heads.safetensors"
# Parameter-name prefixes of the parts saved as their own Hugging Face folders; the rest are heads.
PARTS = {"llm.": "llm", "vision.clip.": "vision", "segmenter.sam.": "sam"}


def export(run_dir: Path, out: Path, step: int | None = None, lora_only: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write the export folder of `run_dir`'s checkpoint at `step` (None: the latest) to `out`."""
    from safetensors.torch import save_file

    from launcher.tokenizer import make_tokenizer

    run_dir, out = Path(run_dir), Path(out)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} missing: --run must be a segcap run directory")
    cfg = load_config(config_file)
    ckpt = checkpoint.find_checkpoint(run_dir, step)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty")

    tokenizer = make_tokenizer(cfg.model.llm)
    model = build_like_training(cfg, tokenizer)
    load_trained(model, checkpoint.trainable_weights(ckpt), ckpt)
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    llm = model.llm
    lora = cfg.model.llm.train_mode == "lora"
    if lora and lora_only:
        llm.save_pretrained(str(out / "adapter"), save_embedding_layers=False)
        _relative_base(out / "adapter")
        llm = llm.unload()  # the base model without the adapter layers
    elif lora:
        llm = llm.merge_and_unload()
    from modeling.llm import merge_new_token_rows

    merge_new_token_rows(llm)
    llm.config.use_cache = True
    llm.save_pretrained(str(out / "llm"), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out / "llm"))
    model.vision.clip.save_pretrained(str(out / "vision"), safe_serialization=True)
    model.segmenter.sam.save_pretrained(str(out / "sam"), safe_serialization=True)
    heads = {n: t.detach().contiguous() for n, t in model.state_dict().items() if not n.startswith(tuple(PARTS))}
    save_file(heads, str(out / HEADS_FILE))

    mcfg = OmegaConf.to_container(OmegaConf.structured(cfg.model), resolve=True)
    mcfg["llm"].update(path="llm", gguf_file=None, tokenizer="llm", train_mode="frozen")
    mcfg["vision"]["path"] = "vision"
    mcfg["pixel_encoder"]["path"] = "sam"
    mcfg["init_from"] = []  # every weight is in the folder now
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    meta = {"run": str(run_dir.resolve()), "step": marker["step"], "lora": "adapter" if lora and lora_only else "merged" if lora else "none",
            "max_length": cfg.data.max_length,
            "clip_frame": cfg.data.clip_frame}  # the CLIP preprocessing the run trained with (LLaVA's "pad")
    (out / CONFIG_FILE).write_text(yaml.safe_dump({"model": mcfg, "export": meta}, sort_keys=False))
    return out


def build_like_training(cfg, tokenizer):
    """The run's model on this process, with the frozen weights the run had. Folders give them as they
    are; random parts (tiny models) are drawn differently under ZeRO-3's zero.Init than without it
    (docs/LEARNED.md), so a ZeRO-3 run's model is built that way (one rank) and copied out whole."""
    from modeling import build_model

    m = cfg.model
    # Sources that give only weights this run trained are overwritten by the checkpoint: skip them
    # (stage 2 exports without stage 1's run dir).
    trained = {"projector", "seg_mlp"} | ({"lora", "token_rows"} if m.llm.train_mode == "lora" else set())
    m.init_from = [src for src in m.init_from if not set(src.take) <= trained]
    taken = {part for src in m.init_from for part in src.take}
    random_frozen = [key for key, path, part in (("llm", m.llm.path, "llm"), ("vision", m.vision.path, "vision"),
                                                 ("pixel_encoder", m.pixel_encoder.path, "sam_encoder"))
                     if not path and part not in taken]
    if cfg.train.zero_stage != 3 or not random_frozen:
        return build_model(m, tokenizer)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from launcher import dist
    from launcher.engine import render_ds_config
    from launcher.tokenizer import make_tokenizer

    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, backend="gloo", source="single")
    dist.init(info)  # zero.Init needs a process group: one rank of its own
    dschf = HfDeepSpeedConfig(render_ds_config(cfg, info))
    zero_model = build_model(m, make_tokenizer(m.llm), dschf=dschf)
    unset_hf_deepspeed_config()
    del dschf
    model = build_model(m, tokenizer)
    params = dict(zero_model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())), torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model


def load_trained(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's trainable weights into a freshly built model; every trainable parameter
    must be there and every tensor must belong to one (else the error lists them)."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"{source}: trainable weights do not match the run's model: missing {missing[:10]} "
                           f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            if p.shape != value.shape:
                raise RuntimeError(f"{source}: {name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


def _relative_base(adapter: Path) -> None:
    """peft records the base model's path; point it at the folder's own llm/ (relative: the folder moves)."""
    file = adapter / "adapter_config.json"
    conf = json.loads(file.read_text())
    conf["base_model_name_or_path"] = "../llm"
    file.write_text(json.dumps(conf, indent=2))


def read_export_config(folder: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of an export folder with absolute paths, and its export metadata."""
    folder = Path(folder)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} missing: --model must be a folder written by `python -m launcher export`")
    raw = yaml.safe_load(file.read_text())
    cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw["model"]))
    cfg.llm.path = str(folder / cfg.llm.path)
    cfg.llm.tokenizer = str(folder / cfg.llm.tokenizer)
    cfg.vision.path = str(folder / cfg.vision.path)
    cfg.pixel_encoder.path = str(folder / cfg.pixel_encoder.path)
    return cfg, raw["export"]


def load_export(folder: Path, dtype: str | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from an export folder: nothing random is left (every weight is read)."""
    from safetensors.torch import load_file

    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    folder = Path(folder)
    cfg, meta = read_export_config(folder)
    if dtype:
        cfg.dtype = dtype
    tokenizer = make_tokenizer(cfg.llm)
    model = build_model(cfg, tokenizer)
    if meta["lora"] == "adapter":
        from peft import PeftModel

        model.llm = PeftModel.from_pretrained(model.llm, str(folder / "adapter"))
    heads = load_file(str(folder / HEADS_FILE))
    expected = {n for n in model.state_dict() if not n.startswith(tuple(PARTS))}
    if set(heads) != expected:
        raise RuntimeError(f"{folder / HEADS_FILE}: missing {sorted(expected - set(heads))}, unexpected {sorted(set(heads) - expected)}")
    model.load_state_dict(heads, strict=False)
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer, meta
