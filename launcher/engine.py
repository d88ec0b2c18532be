"""The DeepSpeed side of a run: render the JSON config from the train config, build the LR schedule
and the engine. The rendered JSON is what actually ran; the trainer saves it beside the run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from launcher.config import CONFIG_ROOT, RunConfig
from launcher.dist import DistInfo


def render_ds_config(cfg: RunConfig, info: DistInfo) -> dict[str, Any]:
    """Fill every "auto" of configs/deepspeed/*.json from the run config; other values stay as written."""
    path = Path(cfg.train.deepspeed_config)
    if not path.is_absolute() and not path.exists():
        path = CONFIG_ROOT.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: no file {path}")
    ds = json.loads(path.read_text())
    on_gpu = info.backend == "nccl"
    auto = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * info.world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer.params.lr": cfg.optim.lr,
        "optimizer.params.betas": list(cfg.optim.betas),
        "optimizer.params.weight_decay": cfg.optim.weight_decay,
        # DeepSpeed's fused Adam needs CUDA; torch's AdamW runs anywhere.
        "optimizer.params.torch_adam": not on_gpu,
        "bf16.enabled": cfg.train.precision == "bf16",
        "fp16.enabled": cfg.train.precision == "fp16",
        "zero_optimization.stage": cfg.train.zero_stage,
        "zero_optimization.stage3_param_persistence_threshold": cfg.train.zero3_persistence_threshold,
        "zero_optimization.zero_hpz_partition_size": cfg.train.zero3_hpz_partition_size,
        "zero_optimization.zero_quantized_weights": cfg.train.zero3_quantized_weights,
        "zero_optimization.zero_quantized_gradients": cfg.train.zero3_quantized_gradients,
    }
    _fill(ds, auto)
    return ds


def _fill(ds: dict, values: dict[str, Any]) -> None:
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = ds
        for p in parents:
            node = node.get(p, {})
        if node.get(leaf) == "auto":
            node[leaf] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ValueError(f"deepspeed config: no rule fills 'auto' at {leftover}")


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def lr_lambda(cfg: RunConfig):
    """Linear warm-up, then cosine/linear decay to min_lr_ratio, or constant."""
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return factor


def param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[torch.nn.Parameter] | list[dict]:
    """The trainable parameters, grouped by optim.lr_mult (plain list when it is empty). Each group's
    "lr" is the base lr times its multiplier; the LR schedule then scales every group alike."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mult = dict(cfg.optim.lr_mult)
    if not mult:
        return [p for _, p in named]
    for prefix in mult:
        if not any(_under(n, prefix) for n, _ in named):
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise ValueError(f"optim.lr_mult: {prefix!r} matches no trainable parameter; top-level trainable modules: {tops}")
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for n, p in named:
        hits = [k for k in mult if _under(n, k)]
        factor = mult[max(hits, key=len)] if hits else 1.0
        groups.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": cfg.optim.lr * f} for f, ps in sorted(groups.items())]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def build_engine(model: torch.nn.Module, params: list, cfg: RunConfig, ds_config: dict):
    import deepspeed

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config, lr_scheduler=schedule
    )
    return engine


def build_run(cfg: RunConfig, ds_config: dict):
    """Tokenizer, model and DeepSpeed engine of a run (training and evaluation build them alike).

    transformers' HfDeepSpeedConfig must be alive while the model is built: the LLM is then created
    under deepspeed.zero.Init, so a 13B model is partitioned as it loads instead of whole on every rank.
    """
    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    dschf = None
    if cfg.train.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        dschf = HfDeepSpeedConfig(ds_config)
    tokenizer = make_tokenizer(cfg.model.llm)
    model = build_model(cfg.model, tokenizer, dschf=dschf)
    engine = build_engine(model, param_groups(model, cfg), cfg, ds_config)
    engine.hf_deepspeed_config = dschf  # transformers holds it weakly: keep it for the run's lifetime
    return tokenizer, model, engine
