"""model.init_from: copy weights from other checkpoints into a built SegCapModel, in list order. A source
is a segcap run dir or export, LLaVA-1.5 (original or llava-hf layout) or a segment-anything `.pth`; its keys are
renamed to segcap's, every requested part is checked (missing, unexpected, shapes) on every rank before
one weight is copied, then rank 0 reads the tensors and ZeRO-3 / a broadcast gives them to the others."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from modeling.config import INIT_KINDS, INIT_PARTS, InitSource, ModelConfig
from modeling.llm import SPECIAL_TOKENS

# What a source can give, by segcap module: every parameter of the model belongs to exactly one part.
PARTS, KINDS = INIT_PARTS, INIT_KINDS
OFFERS = {
    "segcap": PARTS,
    "export": PARTS,
    "llava": ("llm", "projector", "vision"),
    "llava_hf": ("llm", "projector", "vision"),
    "sam": ("sam_encoder", "decoder"),
}
# The modules a kind can hold at all (the multigranular decoder, say, exists only in segcap runs).
_SCOPE = {"segcap": ("",), "export": ("",), "llava": ("llm.", "vision."), "llava_hf": ("llm.", "vision."), "sam": ("segmenter.sam.",)}
# Written by launcher/checkpoint.py (which modeling may not import): a step dir is usable once it has it.
COMPLETE_MARKER = "COMPLETE"
# Buffers some checkpoints carry that are not parameters here (recomputed by the modules themselves).
# SamModel's prompt encoder holds shared_image_embedding's matrix again (tied): one parameter here.
_IGNORED = re.compile(r"(^|\.)(position_ids|inv_freq|pixel_mean|pixel_std)$|prompt_encoder\.shared_embedding\.")


class InitFromError(ValueError):
    """A source that cannot be loaded as asked; the message names model.init_from[i], the path and keys."""


class ModelPathError(FileNotFoundError):
    """A configured model file or folder that is not there (one line: key, path, SEGCAP_MODEL_ROOT)."""


def part_of(name: str) -> str:
    """The part of a normalised segcap parameter name (see normalise)."""
    if name.startswith("vision.projector."):
        return "projector"
    if name.startswith("vision."):
        return "vision"
    if name.startswith("text_hidden_fcs."):
        return "seg_mlp"
    if name.startswith("segmenter.sam.vision_encoder."):
        return "sam_encoder"
    if name.startswith(("segmenter.", "mg.")):
        return "decoder"
    if "lora_" in name:
        return "lora"
    if name.endswith(".rows"):
        return "token_rows"
    return "llm"


def normalise(name: str) -> str:
    """A SegCapModel parameter name without peft's and the new-row wrappers' extra levels, so that a
    LoRA model and a plain one, and a Llama checkpoint, name the same weight alike:
    llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight -> llm.model.layers.0.self_attn.q_proj.weight,
    llm.base_model.model.model.embed_tokens.base.weight -> llm.model.embed_tokens.weight."""
    if name.startswith("llm.base_model.model."):
        name = "llm." + name[len("llm.base_model.model.") :]
    name = name.replace(".base_layer.", ".")
    # CLIPVisionModel's parameters sit under vision_model. in transformers 4, directly in 5; files have either
    if name.startswith("vision.clip.vision_model."):
        name = "vision.clip." + name[len("vision.clip.vision_model.") :]
    for wrapped in ("embed_tokens", "lm_head"):
        name = name.replace(f"{wrapped}.base.", f"{wrapped}.")
    return name


# ------------------------------------------------------------------------------- key renaming
def _llava_name(key: str) -> str | None:
    """liuhaotian/llava-v1.5-*: a Llama checkpoint plus model.mm_projector.{0,2} (and, in some
    releases, model.vision_tower.vision_tower.*)."""
    if key.startswith("model.mm_projector."):
        return "vision.projector." + key[len("model.mm_projector.") :]
    if key.startswith("model.vision_tower.vision_tower."):
        return normalise("vision.clip." + key[len("model.vision_tower.vision_tower.") :])
    if key.startswith(("model.", "lm_head.")):
        return "llm." + key
    return None


# llava-hf names, after an optional leading "model." (transformers 5 in memory); the Hub's files (and
# transformers 5's save_pretrained) use language_model.model.*, and vision_tower.* with or without vision_model.
_LLAVA_HF = (
    ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."),
    ("language_model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
    ("vision_tower.", "vision.clip."),
    ("multi_modal_projector.linear_1.", "vision.projector.0."),
    ("multi_modal_projector.linear_2.", "vision.projector.2."),
)


def _llava_hf_name(key: str) -> str | None:
    key = key[len("model.") :] if key.startswith("model.") else key
    for old, new in _LLAVA_HF:
        if key.startswith(old):
            return normalise(new + key[len(old) :])
    return None


# segment-anything module paths -> transformers SamModel's (same tensors, other names). Substring
# replacements, applied in order; the hypernetwork and IoU MLPs (layers.0/1/2) are renamed separately.
_SAM_RENAMES = (
    ("image_encoder.", "vision_encoder."),
    ("patch_embed.proj.", "patch_embed.projection."),
    (".blocks.", ".layers."),
    ("neck.0.", "neck.conv1."),
    ("neck.1.", "neck.layer_norm1."),
    ("neck.2.", "neck.conv2."),
    ("neck.3.", "neck.layer_norm2."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".norm3.", ".layer_norm3."),
    (".norm4.", ".layer_norm4."),
    (".norm_final_attn.", ".layer_norm_final_attn."),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
    ("point_embeddings.", "point_embed."),
)
_SAM_MLP = re.compile(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d)\.(.*)$")


def _sam_name(key: str) -> str | None:
    """segment-anything's Sam state dict (image_encoder/prompt_encoder/mask_decoder) -> segcap names."""
    if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
        # One random Fourier matrix serves the prompts and the image grid; SamModel keeps it once.
        return "segmenter.sam.shared_image_embedding.positional_embedding"
    m = _SAM_MLP.match(key)
    if m:  # 3-layer MLPs: segment-anything's layers.0/1/2 are SamModel's proj_in / layers.0 / proj_out
        key = f"{m.group(1)}.{('proj_in', 'layers.0', 'proj_out')[int(m.group(2))]}.{m.group(3)}"
    for old, new in _SAM_RENAMES:
        key = key.replace(old, new)
    if not key.startswith(("vision_encoder.", "prompt_encoder.", "mask_decoder.")):
        return None
    return "segmenter.sam." + key


# ----------------------------------------------------------------------------- reading sources
@dataclass
class Source:
    """The tensors of one source under segcap names: `shapes` for the checks (known on every rank),
    `read(name)` for the data (called on rank 0 only)."""

    kind: str
    shapes: dict[str, tuple[int, ...]]
    unmapped: list[str]  # keys the renaming does not know: an error if any
    read: Callable[[str], torch.Tensor] | None = None


def detect_kind(path: Path) -> str:
    if path.is_file():
        return "sam"
    if (path / "checkpoints").is_dir():
        return "segcap"
    if (path / "segcap.yaml").is_file() and (path / "heads.safetensors").is_file():
        return "export"
    config = path / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        if "text_config" in c and "vision_config" in c:
            return "llava_hf"
        if "mm_hidden_size" in c or "mm_projector_type" in c:
            return "llava"
    raise InitFromError(f"cannot tell what {path} holds (a segcap run dir has checkpoints/, LLaVA a config.json "
                        "with mm_* or text_config keys, segment-anything is a .pth file); set its `kind`")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: its shard index if any, else the single file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    raise InitFromError(f"{folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def _open_files(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """Shapes without reading the data: safetensors headers, or torch.load memory-mapped."""
    from safetensors import safe_open

    where: dict[str, object] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise InitFromError(f"missing weight file {f}")
        if f.suffix == ".safetensors":
            handle = safe_open(str(f), framework="pt")
            for k in handle.keys():
                shapes[k] = tuple(handle.get_slice(k).get_shape())
                where[k] = handle
        else:
            try:
                state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # files from torch < 1.6 cannot be memory-mapped
                state = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # some training scripts wrap the state dict
            for k, v in state.items():
                shapes[k] = tuple(v.shape)
                where[k] = state

    def read(key: str) -> torch.Tensor:
        h = where[key]
        return h[key] if isinstance(h, dict) else h.get_tensor(key)

    return shapes, read


def latest_complete_step(run_dir: Path) -> Path:
    steps = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / COMPLETE_MARKER).is_file()]
    if not steps:
        raise InitFromError(f"{run_dir}/checkpoints has no complete checkpoint (step_*/{COMPLETE_MARKER})")
    return max(steps, key=lambda p: int(p.name.split("_", 1)[1]))


def _open_segcap(run_dir: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """The fp32 trainable weights of the latest complete checkpoint (frozen weights are not in it: they
    come from their own sources): the consolidated trainable/model.safetensors that launcher/checkpoint.py
    writes beside the shards, else the ZeRO shards through DeepSpeed's own zero_to_fp32."""
    step = latest_complete_step(run_dir)
    consolidated = step / "trainable" / "model.safetensors"
    if consolidated.is_file():
        raw, read_raw = _open_files([consolidated])
        names = {normalise(k): k for k in raw}
        return {n: raw[k] for n, k in names.items()}, lambda n: read_raw(names[n])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag=step.name, exclude_frozen_parameters=True)
    state = {normalise(k): v for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def _open_export(folder: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """A `launcher export` folder: llm/ (LoRA merged, new-token rows in place), adapter/ (--lora-only),
    vision/, sam/ (Hugging Face folders) and heads.safetensors (segcap names). The new tokens' rows
    (token_rows) are the llm/ matrices' rows at the ids its tokenizer gives them."""
    shapes: dict[str, tuple[int, ...]] = {}
    readers: dict[str, Callable[[], torch.Tensor]] = {}

    def add(files: list[Path], rename: Callable[[str], str | None]) -> None:
        raw, read_raw = _open_files(files)
        for key, shape in raw.items():
            name = rename(key)
            if name is not None and not _IGNORED.search(key):
                shapes[name], readers[name] = shape, (lambda k=key: read_raw(k))

    add([folder / "heads.safetensors"], normalise)
    add(_weight_files(folder / "llm"), lambda k: "llm." + k)
    for sub, prefix in (("vision", "vision.clip."), ("sam", "segmenter.sam.")):
        if (folder / sub).is_dir():
            add(_weight_files(folder / sub), lambda k, prefix=prefix: normalise(prefix + k))
    adapter = folder / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():  # peft's names: base_model.model.<module>.lora_A.weight (adapter name left out)
        add([adapter], lambda k: normalise("llm." + re.sub(r"\.(lora_[AB])\.", r".\1.default.", k)))
    added = json.loads((folder / "llm" / "tokenizer.json").read_text()).get("added_tokens", [])
    ids = sorted(t["id"] for t in added if t["content"] in SPECIAL_TOKENS)
    for matrix in ("llm.model.embed_tokens", "llm.lm_head"):
        if f"{matrix}.weight" in shapes and ids:
            shapes[f"{matrix}.rows"] = (len(ids), shapes[f"{matrix}.weight"][1])
            readers[f"{matrix}.rows"] = lambda m=matrix: readers[f"{m}.weight"]()[ids]
    return shapes, lambda name: readers[name]()


_RENAME = {"llava": _llava_name, "llava_hf": _llava_hf_name, "sam": _sam_name}


def open_source(src: InitSource) -> Source:
    """Rank 0's view of a source: names, shapes and a reader (the data stays on disk until read)."""
    path = Path(src.path)
    if not path.exists():
        raise InitFromError(f"no such file or folder {path}")
    kind = detect_kind(path) if src.kind == "auto" else src.kind
    if kind in ("segcap", "export"):
        shapes, read = (_open_segcap if kind == "segcap" else _open_export)(path)
        return Source(kind, shapes, [], read)
    files = [path] if path.is_file() else _weight_files(path)
    raw, read_raw = _open_files(files)
    rename = _RENAME[kind]
    shapes, back, unmapped = {}, {}, []
    for key, shape in raw.items():
        if _IGNORED.search(key):
            continue
        name = rename(key)
        if name is None:
            unmapped.append(key)
        else:
            shapes[name], back[name] = shape, key
    return Source(kind, shapes, sorted(unmapped), lambda name: read_raw(back[name]))


# --------------------------------------------------------------------------------- checking
@dataclass
class Plan:
    """What one source writes: segcap parameter name -> source name, and whether the LLM's vocabulary
    rows are copied (LLaVA: up to the first new token's id, the new rows then re-initialised)."""

    copies: dict[str, str]
    vocab_rows: int | None  # None: whole tensors


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def plan_source(model: nn.Module, src: InitSource, kind: str, shapes: dict[str, tuple[int, ...]], unmapped: list[str]) -> Plan:
    """Every requested part must be covered exactly: its parameters all present in the source (for a
    segcap run: all those that train here, since a checkpoint holds trainable weights only), nothing
    extra, and equal shapes. Raises InitFromError listing every offending key."""
    take = set(src.take)
    bad = sorted(take - set(OFFERS[kind]))
    if bad:
        raise InitFromError(f"take {bad}: a {kind} source offers {list(OFFERS[kind])}")
    if unmapped:
        raise InitFromError(f"unexpected keys (not in a {kind} layout): {_few(unmapped)}")
    params = {normalise(n): p for n, p in model.named_parameters()}
    wanted = {n: p for n, p in params.items() if part_of(n) in take and n.startswith(_SCOPE[kind])}
    offered = {n for n in shapes if part_of(n) in take}
    if not offered:
        raise InitFromError(f"the source holds nothing for {sorted(take)}")
    expected = {n for n, p in wanted.items() if kind != "segcap" or p.requires_grad}
    missing = sorted(expected - offered)
    unexpected = sorted(offered - set(wanted))
    if missing:
        raise InitFromError(f"missing keys for {sorted(take)}: {_few(missing)}")
    if unexpected:
        raise InitFromError(f"unexpected keys (the model has no such parameter): {_few(unexpected)}")
    vocab_rows = None
    if "llm" in take and kind in ("llava", "llava_hf"):
        vocab_rows = min(model.token_ids.values())  # the first new token: rows below come from the source
    wrong = []
    for n in sorted(offered):
        want, have = _shape(wanted[n]), shapes[n]
        if vocab_rows is not None and _is_vocab_matrix(n):
            ok = len(have) == 2 and have[0] >= vocab_rows and have[1] == want[1]
        else:
            ok = have == want
        if not ok:
            wrong.append(f"{n} {list(have)} (model: {list(want)})")
    if wrong:
        raise InitFromError(f"shape mismatch: {_few(wrong)}")
    return Plan({n: n for n in sorted(offered)}, vocab_rows)  # sorted: every rank gathers in the same order


def _is_vocab_matrix(name: str) -> bool:
    return name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


def _few(items: list[str], n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --------------------------------------------------------------------------------- copying
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_tensor(t: torch.Tensor) -> None:
    """Rank 0's values to every rank, for parameters ZeRO-3 does not partition (built outside zero.Init)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        buf = t.data.to(deepspeed.get_accelerator().current_device_name())
        dist.broadcast(buf, src=0)
        t.data.copy_(buf.to(t.device))
    else:
        dist.broadcast(t.data, src=0)


def _write(params: list[nn.Parameter], fill: Callable[[], None]) -> None:
    """Run `fill` (which writes `params`) on rank 0; partitioned parameters are gathered first and
    re-partitioned from rank 0's values, the others are broadcast."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0), torch.no_grad():
        if _rank() == 0:
            fill()
    for p in params:
        if not hasattr(p, "ds_id"):
            _broadcast_tensor(p)


def _copy(model: nn.Module, plan: Plan, read: Callable[[str], torch.Tensor] | None) -> None:
    params = {normalise(n): p for n, p in model.named_parameters()}
    for name, source_name in plan.copies.items():
        p = params[name]

        def fill(p=p, source_name=source_name, name=name):
            t = read(source_name)
            if plan.vocab_rows is not None and _is_vocab_matrix(name):
                p[: plan.vocab_rows] = t[: plan.vocab_rows].to(p.dtype)
            else:
                p.copy_(t.to(p.dtype))

        _write([p], fill)
    if plan.vocab_rows is not None:
        _reset_new_rows(model, plan.vocab_rows)


def _reset_new_rows(model: nn.Module, old: int) -> None:
    """After the vocabulary came from a checkpoint, the new tokens' rows start again from the mean of
    its rows, as modeling.llm.add_special_tokens initialises them."""
    llm = model.llm
    for module in (llm.get_input_embeddings(), llm.get_output_embeddings()):
        base = getattr(module, "base", module)
        rows = getattr(module, "rows", None)
        params = [base.weight] + ([rows] if rows is not None else [])

        def fill(base=base, rows=rows):
            mean = base.weight[:old].float().mean(0, keepdim=True)
            base.weight[old:] = mean.to(base.weight.dtype)
            if rows is not None:
                rows.copy_(mean.expand_as(rows).to(rows.dtype))

        _write(params, fill)


def load_init_from(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply cfg.init_from in order (later sources overwrite earlier ones). Every source is opened
    and checked before anything is copied, so a bad entry changes no weight."""
    sources, plans = [], []
    for i, src in enumerate(cfg.init_from):
        where = f"model.init_from[{i}] ({src.path})"
        source, view = None, None
        if _rank() == 0:
            try:
                source = open_source(src)
                view = (source.kind, source.shapes, source.unmapped, None)
            except InitFromError as e:
                view = (None, None, None, str(e))
        kind, shapes, unmapped, error = _broadcast_object(view)  # every rank raises the same error
        if error is not None:
            raise InitFromError(f"{where}: {error}")
        try:
            plans.append(plan_source(model, src, kind, shapes, unmapped))
        except InitFromError as e:
            raise InitFromError(f"{where}: {e}") from None
        sources.append(source)
    for source, plan in zip(sources, plans):
        _copy(model, plan, source.read if source is not None else None)


# ------------------------------------------------------------------------------ paths up front
def check_model_paths(cfg: ModelConfig) -> None:
    """One-line errors for model folders that are not there, before any process group or engine
    starts (transformers would otherwise fail much later, asking for a Hub repo id)."""
    root = os.environ.get("SEGCAP_MODEL_ROOT")
    hint = f"SEGCAP_MODEL_ROOT={root}" if root else "SEGCAP_MODEL_ROOT is unset"
    checks = [("model.llm.path", cfg.llm.path, cfg.llm.gguf_file or "config.json"),
              ("model.vision.path", cfg.vision.path, "config.json"),
              ("model.pixel_encoder.path", cfg.pixel_encoder.path, "config.json")]
    if cfg.llm.tokenizer not in ("synthetic", "llm"):
        checks.append(("model.llm.tokenizer", cfg.llm.tokenizer, None))
    for i, src in enumerate(cfg.init_from):
        checks.append((f"model.init_from[{i}].path", src.path, None))
    for key, path, inside in checks:
        if not path:
            continue
        p = Path(path)
        if not p.exists():
            raise ModelPathError(f"{key}: no such file or folder {p} ({hint})")
        if inside and not (p / inside).is_file():
            raise ModelPathError(f"{key}: {p} is not a model folder (no {inside} in it) ({hint})")
        if key.startswith("model.init_from") and (p / "checkpoints").is_dir():
            try:
                latest_complete_step(p)
            except InitFromError as e:
                raise ModelPathError(f"{key}: {e}") from None
