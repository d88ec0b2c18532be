"""Typed run configuration: dataclasses, YAML composition, dotted overrides, validation.

Config is composed and validated once, at the edge (`load_config`); everything below receives these
typed objects. An unknown key or a wrong type is a `ConfigError` that names the key and the choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from datapipes.config import DataConfig
from modeling.config import INIT_KINDS, INIT_PARTS, InitSource, LLMConfig, MaskDecoderConfig, ModelConfig

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "data")  # sections that a train YAML may pick by name from configs/<group>/


class ConfigError(ValueError):
    """A config that cannot run: names the offending key and what would be valid."""


# ----------------------------------------------------------------------------------------- train
@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # Learning-rate multipliers by parameter-name prefix (LLaVA's mm_projector_lr, generalised), e.g.
    # {segmenter: 2.0}; the longest matching prefix wins, unmatched parameters get 1. A prefix that
    # matches no trainable parameter is an error. Dotted prefixes go in YAML (quoted keys), not overrides.
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"  # checkpoints, rendered configs, metrics.jsonl, overlays
    steps: int = 100  # optimizer steps
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once at the end
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    time_budget_s: float = 0.0  # > 0: save and stop cleanly after this many seconds
    zero_stage: int = 3
    # Parameters smaller than this stay whole on every rank under ZeRO-3 (DeepSpeed's default 1e5);
    # the tiny configs set 0 so that every parameter really is partitioned.
    zero3_persistence_threshold: int = 100000
    # ZeRO++ (stage 3 only; `launcher plan` estimates what each saves): hierarchical partitioning keeps a
    # secondary copy of the 16-bit weights inside each group of this many GPUs (a node) so that backward
    # gathers stay off the inter-node network (1: off); quantised weights (int8 all-gather) and gradients
    # (int4 reduce-scatter) halve / quarter those volumes.
    zero3_hpz_partition_size: int = 1
    zero3_quantized_weights: bool = False
    zero3_quantized_gradients: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    deepspeed_config: str = "configs/deepspeed/zero3.json"


@dataclass
class EvalConfig:
    # teacher_forced: one forward pass over the reference conversation (LISA/GLaMM validate; an empty
    # target then shows nothing and is left out); generate: the model writes its answer (N-acc, captions)
    mode: str = "teacher_forced"
    max_samples: int = 512  # over all ranks; 0: no cap
    max_new_tokens: int = 40
    max_batches: int = 0  # per rank; 0: the whole val set (up to max_samples)
    num_overlays: int = 8
    mask_threshold: float = 0.0  # on logits
    at_start: bool = False  # also evaluate the untrained model (logged as val_untrained/*)


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: MLFLOW_TRACKING_URI, else a local SQLite store beside output_dir.
    tracking_uri: Optional[str] = None
    experiment: str = "segcap"
    run_name: Optional[str] = None
    log_overlays: bool = True
    # The store is written by a background thread (launcher/spool.py); these bound what rank 0 waits.
    request_timeout_s: float = 10.0  # one HTTP call to a tracking server (MLFLOW_HTTP_REQUEST_TIMEOUT wins)
    max_backoff_s: float = 30.0  # retry interval cap while the store is down
    start_wait_s: float = 5.0  # at start, for the run id (not at all while the store fails)
    flush_timeout_s: float = 30.0  # at finish/flush: give up draining the spool after this long without progress (ditto)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Closed sets of string values, checked after the types: (dataclass, field) -> choices.
CHOICES: dict[tuple[type, str], tuple[str, ...]] = {
    (LLMConfig, "train_mode"): ("lora", "full", "frozen"),
    (LLMConfig, "attn_implementation"): ("auto", "sdpa", "eager", "flash_attention_2"),
    (LLMConfig, "chat_template"): ("vicuna_v1", "llama2", "llm"),
    (MaskDecoderConfig, "kind"): ("sam", "multigranular"),
    (InitSource, "kind"): ("auto", *INIT_KINDS),
    (DataConfig, "clip_frame"): ("squash", "pad"),
    (ModelConfig, "dtype"): ("float32", "bfloat16", "float16"),
    (OptimConfig, "schedule"): ("cosine", "linear", "constant"),
    (TrainConfig, "precision"): ("fp32", "bf16", "fp16"),
    (EvalConfig, "mode"): ("teacher_forced", "generate"),
    (TrainConfig, "zero_stage"): (0, 1, 2, 3),
}


# ------------------------------------------------------------------------------------ loading
def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse {path}: {e}") from e


def _group_file(group: str, name: str) -> Path:
    path = CONFIG_ROOT / group / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name!r}: no {path}; choices: {have}")
    return path


def _compose(path: Path, overrides: list[str]) -> DictConfig:
    """`defaults: {model: tiny, data: synthetic}` picks group files; the file's own sections, then the
    command-line overrides (`key.sub=value`, or `model=NAME` to pick another group file), go on top."""
    user = _read_yaml(path)
    defaults = dict(user.pop("defaults", None) or {})
    dotted = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key in GROUPS:
            defaults[key] = value
        else:
            dotted.append(item)
    unknown = set(defaults) - set(GROUPS)
    if unknown:
        raise ConfigError(f"defaults: unknown group(s) {sorted(unknown)}; choices: {list(GROUPS)}")
    layers = [OmegaConf.create({g: _read_yaml(_group_file(g, n))}) for g, n in defaults.items()]
    return OmegaConf.merge(*layers, user, OmegaConf.from_dotlist(dotted)) if layers or dotted else user


def _valid_keys(full_key: str) -> list[str]:
    """The field names at the level of `full_key` (for error messages)."""
    cls: Any = RunConfig
    for part in full_key.split(".")[:-1]:
        hints = {f.name: f for f in dataclasses.fields(cls)}
        if part not in hints or not dataclasses.is_dataclass(_field_type(cls, part)):
            return []
        cls = _field_type(cls, part)
    return [f.name for f in dataclasses.fields(cls)]


def _field_type(cls: type, name: str) -> Any:
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return type(default.default_factory())  # type: ignore[misc]
    return type(default.default)


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{key}[{i}].")
        choices = CHOICES.get((type(obj), f.name))
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choices: {list(choices)}")


def _check_values(cfg: RunConfig) -> None:
    positive = {
        "train.steps": cfg.train.steps,
        "train.grad_accum": cfg.train.grad_accum,
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.max_length": cfg.data.max_length,
        "tracking.request_timeout_s": cfg.tracking.request_timeout_s,
        "tracking.max_backoff_s": cfg.tracking.max_backoff_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")
    if not cfg.data.train:
        raise ConfigError("data.train lists no source")
    zeropp = cfg.train.zero3_hpz_partition_size != 1 or cfg.train.zero3_quantized_weights or cfg.train.zero3_quantized_gradients
    if zeropp and cfg.train.zero_stage != 3:
        raise ConfigError(f"train.zero3_hpz_partition_size / zero3_quantized_*: ZeRO++ needs train.zero_stage=3, not {cfg.train.zero_stage}")
    if cfg.train.zero3_hpz_partition_size < 1:
        raise ConfigError(f"train.zero3_hpz_partition_size={cfg.train.zero3_hpz_partition_size} must be >= 1 (1: off)")
    for i, src in enumerate(cfg.model.init_from):
        if not src.path:
            raise ConfigError(f"model.init_from[{i}].path is empty")
        bad = [t for t in src.take if t not in INIT_PARTS]
        if not src.take or bad:
            raise ConfigError(f"model.init_from[{i}].take={src.take}: list one or more of {list(INIT_PARTS)}")
    if cfg.model.llm.gguf_file and not cfg.model.llm.path:
        raise ConfigError("model.llm.gguf_file needs model.llm.path (the folder holding it)")


def to_runconfig(merged: DictConfig | dict) -> RunConfig:
    """Validate a merged tree against RunConfig; errors name the full key and the choices."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), merged)
        cfg: RunConfig = OmegaConf.to_object(typed)  # type: ignore[assignment]
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(
            f"unknown config key {key!r}; valid keys here: {_valid_keys(key)}"
        ) from None
    except ValidationError as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"bad value for {key!r}: {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}") from None
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = CONFIG_ROOT.parent / path  # allow configs/train/x.yaml from any working dir
    return to_runconfig(_compose(path, list(overrides)))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
