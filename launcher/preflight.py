"""Preflight of a run config on a login node (part of `launcher plan`): model folders readable, the
tokenizer with its special tokens, every data source's manifest, shards against ranks x workers and
token lengths against data.max_length, the checkpoint a run would resume from (and its world size) and the
model.init_from sources. Nothing is trained."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from launcher.config import RunConfig

SAMPLES_PER_SOURCE = 64  # read from the first shards of each source for the length distribution
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Finding:
    level: str  # "error": the run cannot work; "warning": it runs, worse than it could
    what: str  # the config key, source or path concerned
    message: str


def preflight(cfg: RunConfig, world_size: int, stats: dict | None = None) -> list[Finding]:
    """Findings, most serious first in each part; `stats` (if given) receives each source's length statistics."""
    stats = {} if stats is None else stats
    found: list[Finding] = []
    found += _model_folders(cfg)
    tokenizer = _tokenizer(cfg, found)
    for i, source in enumerate(cfg.data.train):
        found += _source(cfg, f"data.train[{i}] {source.name}", source.path, tokenizer, world_size * max(cfg.data.num_workers, 1), stats)
    for i, source in enumerate(cfg.data.val):
        found += _source(cfg, f"data.val[{i}] {source.name}", source.path, tokenizer, None, stats)
    found += _checkpoint(cfg, world_size)
    for i, src in enumerate(cfg.model.init_from):
        if not Path(src.path).exists():
            found.append(Finding("error", f"model.init_from[{i}].path", f"{src.path} does not exist"))
    return found


def _model_folders(cfg: RunConfig) -> list[Finding]:
    out = []
    m = cfg.model
    for key, path in (("model.llm.path", m.llm.path), ("model.vision.path", m.vision.path), ("model.pixel_encoder.path", m.pixel_encoder.path)):
        if not path:
            continue  # random init from the size fields
        folder = Path(path)
        if not folder.is_dir():
            out.append(Finding("error", key, f"{folder} is not a folder"))
            continue
        try:
            json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            out.append(Finding("error", key, f"{folder / 'config.json'} is not readable JSON: {e}"))
        if key == "model.llm.path" and m.llm.gguf_file:
            if not (folder / m.llm.gguf_file).is_file():
                out.append(Finding("error", "model.llm.gguf_file", f"no {folder / m.llm.gguf_file}"))
            continue
        out += _weights(key, folder)
    return out


def _weights(key: str, folder: Path) -> list[Finding]:
    """A sharded checkpoint's index and every shard it names, or one weight file."""
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                files = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return [Finding("error", key, f"{index} is not a weight index: {e}")]
            missing = sorted(f for f in files if not (folder / f).is_file())
            return [Finding("error", key, f"{index} names {len(missing)} missing file(s): {missing[:3]}")] if missing else []
    if any((folder / f).is_file() for f in WEIGHT_FILES):
        return []
    return [Finding("error", key, f"no weights in {folder} (none of {WEIGHT_INDEXES + WEIGHT_FILES})")]


def _tokenizer(cfg: RunConfig, found: list[Finding]):
    """The run's tokenizer with the special tokens added as build_model adds them; None if it fails."""
    from datapipes.text import image_token_id
    from launcher.tokenizer import make_tokenizer
    from modeling.llm import SPECIAL_TOKENS

    try:
        tok = make_tokenizer(cfg.model.llm)
        vocab = tok.get_vocab()
        tok.add_tokens([t for t in SPECIAL_TOKENS if t not in vocab], special_tokens=True)
        for t in SPECIAL_TOKENS:
            ids = tok.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{t!r} encodes to {ids}, not one id")
        image_token_id(tok)
    except Exception as e:  # noqa: BLE001  (a missing folder, a broken tokenizer.json, a token that splits: all reported)
        found.append(Finding("error", "model.llm.tokenizer", f"{cfg.model.llm.tokenizer!r} does not load with its tokens: {e}"))
        return None
    return tok


def _source(cfg: RunConfig, what: str, path: str, tokenizer, slots: int | None, stats: dict) -> list[Finding]:
    from datapipes.shards import ManifestError, read_manifest

    try:
        manifest = read_manifest(path)
    except ManifestError as e:
        return [Finding("error", what, str(e))]
    out = []
    shards = manifest["shards"]
    if slots is not None and len(shards) < slots:
        out.append(Finding(
            "warning", what,
            f"{len(shards)} shard(s) for {slots} reader slots (ranks x data.num_workers): slots share shards, each "
            f"reading whole tars to keep 1/{-(-slots // len(shards))} of their samples; write >= {slots} shards",
        ))
    if tokenizer is not None:
        out += _lengths(cfg, what, [s["url"] for s in shards], tokenizer, stats)
    return out


def _lengths(cfg: RunConfig, what: str, urls: list[str], tokenizer, stats: dict) -> list[Finding]:
    """Token lengths (image tokens included) of the first samples against data.max_length, as the loader
    treats them (datapipes/text.py fit_conversation): longer answers are cut at a phrase boundary, and a
    sample with no cut that fits is skipped as bad; past data.max_bad_fraction the run stops."""
    import webdataset as wds

    from datapipes.schema import BadSample, Sample
    from datapipes.text import (
        TooLong,
        fit_conversation,
        image_token_id,
        tokenize_conversation,
    )

    n_img = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    image_id = image_token_id(tokenizer)
    limit = cfg.data.max_length
    lengths, cut, dropped, invalid, last = [], 0, 0, 0, None
    try:
        for raw in wds.WebDataset(urls[:8], shardshuffle=False, empty_check=False).slice(SAMPLES_PER_SOURCE):
            try:
                conv = Sample.from_json(raw["json"]).conversation
                n = len(tokenize_conversation(conv, tokenizer, image_id=image_id, num_image_tokens=n_img, max_length=1 << 30).input_ids)
            except (BadSample, KeyError) as e:
                invalid, last = invalid + 1, e
                continue
            lengths.append(n)
            if n > limit:
                try:
                    fit_conversation(conv, tokenizer, image_id=image_id, num_image_tokens=n_img, max_length=limit)
                    cut += 1
                except TooLong:
                    dropped += 1
    except Exception as e:  # noqa: BLE001  (an unreadable tar, whatever webdataset raises: reported)
        return [Finding("error", what, f"cannot read its shards: {e}")]
    out = []
    if invalid:
        out.append(Finding("warning", what, f"{invalid} of {invalid + len(lengths)} sampled records are invalid (last: {last})"))
    if not lengths:
        return out + [Finding("error", what, "no readable sample in its first shards")]
    q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else [lengths[0]] * 19
    stats[what] = {"samples": len(lengths), "median": q[9], "p95": q[18], "max": max(lengths), "cut": cut / len(lengths), "dropped": dropped / len(lengths)}
    if not cut and not dropped:
        return out
    shape = f"tokens per sample (with {n_img} image tokens) over {len(lengths)} samples: median {q[9]:.0f}, p95 {q[18]:.0f}, max {max(lengths)}"
    msg = f"of the sampled samples {cut / len(lengths):.0%} exceed data.max_length {limit} and would be cut, {dropped / len(lengths):.0%} dropped; {shape}"
    if dropped / len(lengths) > cfg.data.max_bad_fraction:
        msg += f"; drops above data.max_bad_fraction {cfg.data.max_bad_fraction:.0%} stop the run with a DataError"
        return out + [Finding("error", what, msg)]
    return out + [Finding("warning", what, msg)]


def _checkpoint(cfg: RunConfig, world_size: int) -> list[Finding]:
    """The checkpoint `train` would resume from (train.output_dir, train.resume). Another world size loads
    (checkpoint.load takes its consolidated trainable state), so it is a warning, not an error."""
    from launcher.checkpoint import MARKER, latest_complete

    if not cfg.train.resume:
        return []
    latest = latest_complete(Path(cfg.train.output_dir) / "checkpoints")
    if latest is None:
        return []
    try:
        written_by = json.loads((latest / MARKER).read_text())["world_size"]
    except (OSError, ValueError, KeyError) as e:
        return [Finding("error", "train.output_dir", f"{latest / MARKER} is unreadable: {e}")]
    if written_by != world_size:
        return [Finding(
            "warning", "train.output_dir",
            f"would resume from {latest}, written by {written_by} ranks, on {world_size}: it loads from its "
            f"consolidated trainable state (trainable/); ranks that did not exist then start a fresh RNG",
        )]
    return []
