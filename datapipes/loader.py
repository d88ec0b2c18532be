"""The streaming loaders: WebDataset shards -> decoded, validated, tokenised examples -> Batch.
Train: resampled, shuffled, weighted-mixed, resumable exactly at any step; eval: one pass, every sample
once, the same batch count on every rank. Bad samples are skipped and counted up to a configured rate.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from datapipes.collate import Batch, Example, collate
from datapipes.config import DataConfig, SourceConfig
from datapipes.schema import IMAGE_TOKEN, BadSample, Sample, decode_mask
from datapipes.shards import read_manifest
from datapipes.text import Tokens, image_token_id, tokenize_conversation

# Workers are forked after the main process may have used the tokenizer; its thread pool must not be.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
IMAGE_EXTS = ("png", "jpg", "jpeg")


class DataError(RuntimeError):
    """The data is too broken to train on (too many bad samples, or a shard that disagrees with its manifest)."""


# --- which samples a (rank, worker) slot reads ----------------------------------------------------

@dataclass(frozen=True)
class ShardSlice:
    """The samples of one shard that one slot reads: index % modulo == residue."""

    source: str
    url: str
    count: int  # samples in the shard, from the manifest
    residue: int = 0
    modulo: int = 1

    @property
    def size(self) -> int:
        return len(range(self.residue, self.count, self.modulo))


def assign_slices(shards: list[tuple[str, str, int]], slot: int, num_slots: int) -> list[ShardSlice]:
    """Whole shards round-robin when there are at least as many shards as slots; otherwise slot s reads
    shard s % n and keeps every m-th sample of it (m = the number of slots sharing that shard), so no
    slot is left without data and no sample is read by two slots."""
    n = len(shards)
    if n >= num_slots:
        return [ShardSlice(*shards[i]) for i in range(slot, n, num_slots)]
    j = slot % n
    sharing = len(range(j, num_slots, n))
    return [ShardSlice(*shards[j], residue=slot // n, modulo=sharing)]


def _manifest_shards(source: SourceConfig) -> list[tuple[str, str, int]]:
    return [(source.name, s["url"], s["count"]) for s in read_manifest(source.path)["shards"]]


def _read_slice(sl: ShardSlice, errors: list) -> Iterator[dict]:
    """The raw samples (dicts of bytes) of a slice; tar read errors are appended to `errors`."""

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    for index, raw in enumerate(wds.tarfile_to_samples(handler=handler)([{"url": sl.url}])):
        if index % sl.modulo == sl.residue:
            yield raw


# --- decode one sample ----------------------------------------------------------------------------

@dataclass
class Decoder:
    """Raw tar sample -> Example, or BadSample naming why not."""

    tokenizer: object
    num_image_tokens: int
    max_length: int

    def __post_init__(self) -> None:
        self.image_id = image_token_id(self.tokenizer)

    def __call__(self, raw: dict) -> Example:
        if "json" not in raw:
            raise BadSample("missing", f"sample {raw.get('__key__')} has no .json")
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("missing", f"sample {raw.get('__key__')} has no image (.png/.jpg)")
        sample = Sample.from_json(raw["json"])
        try:
            image = Image.open(io.BytesIO(raw[ext]))
            image.load()
            image = image.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise BadSample("image", f"image does not decode: {e}") from e
        h, w = sample.image_size
        if (image.height, image.width) != (h, w):
            raise BadSample("image", f"image is {image.height}x{image.width}, its JSON says {h}x{w}")
        masks = np.stack([_decode(m.rle, h, w) for m in sample.masks]) if sample.masks else np.zeros((0, h, w), np.uint8)
        tokens = tokenize_conversation(
            sample.conversation, self.tokenizer, image_id=self.image_id,
            num_image_tokens=self.num_image_tokens, max_length=self.max_length,
        )
        example = Example(raw["__key__"], sample.task, image, masks, tokens, sample.extra, sample=sample)
        if any(m.rle is None or m.instances for m in sample.masks):  # box-only or set targets
            _add_instances(example, sample, h, w)
        return example

    def filler(self, size: int) -> Example:
        """A blank sample that keeps ranks in step; metrics ignore it (is_padding)."""
        conv = [{"role": "user", "content": f"{IMAGE_TOKEN}\n"}, {"role": "assistant", "content": ""}]
        tokens = tokenize_conversation(conv, self.tokenizer, image_id=self.image_id,
                                       num_image_tokens=self.num_image_tokens, max_length=1 << 30)
        return Example("__padding__", "padding", Image.new("RGB", (size, size)), np.zeros((0, size, size), np.uint8),
                       tokens, {}, is_padding=True)


def _decode(rle: dict | None, h: int, w: int) -> np.ndarray:
    return decode_mask(rle) if rle is not None else np.zeros((h, w), np.uint8)


def _add_instances(example: Example, sample: Sample, h: int, w: int) -> None:
    """The instance-level targets of a sample whose [SEG]s are box-only or stand for several instances."""
    regions, owner = [], []
    for i, m in enumerate(sample.masks):
        for r in m.instances or [{"rle": m.rle, "box": m.box}]:
            regions.append(r)
            owner.append(i)
    example.boxes = np.array([r["box"] for r in regions], np.float32).reshape(-1, 4)
    example.owner = np.array(owner, np.int64)
    example.has_mask = np.array([r["rle"] is not None for r in regions], bool)
    example.instance_masks = np.stack([_decode(r["rle"], h, w) for r in regions])


class SkipCounter:
    """Counts seen and skipped samples of one worker; raises DataError past the allowed rate."""

    def __init__(self, max_bad_fraction: float, min_seen: int, where: str):
        self.max_bad_fraction, self.min_seen, self.where = max_bad_fraction, min_seen, where
        self.seen = 0
        self.bad: dict[str, Counter] = {}  # source -> reason -> count
        self.last: dict[str, str] = {}  # source -> the last bad sample, for the error message
        self.pending: Counter = Counter()  # since the last batch

    def ok(self) -> None:
        self.seen += 1

    def skip(self, source: str, url: str, key: str, err: BadSample | Exception) -> None:
        reason = getattr(err, "reason", "tar")
        self.seen += 1
        self.bad.setdefault(source, Counter())[reason] += 1
        self.pending[reason] += 1
        self.last[source] = f"{url} key {key}: {err}"
        n_bad = sum(sum(c.values()) for c in self.bad.values())
        if self.seen >= self.min_seen and n_bad / self.seen > self.max_bad_fraction:
            detail = "; ".join(
                f"source {src!r}: {dict(c)} (last: {self.last[src]})" for src, c in sorted(self.bad.items())
            )
            raise DataError(
                f"{self.where}: {n_bad} of {self.seen} samples bad ({n_bad / self.seen:.1%} > max_bad_fraction "
                f"{self.max_bad_fraction:.1%}); {detail}"
            )

    def take(self) -> dict[str, int]:
        out = dict(self.pending)
        self.pending.clear()
        return out


# --- train ----------------------------------------------------------------------------------------

class TrainStream(torch.utils.data.IterableDataset):
    """Infinite batches of one rank. Worker i of W plays role (start_step + i) % W: role r makes the
    global batches r, r + W, r + 2W, ... so in-order delivery gives start_step, start_step + 1, ...;
    batches before start_step are still drawn (decoded, counted) but not collated."""

    def __init__(self, cfg: DataConfig, tokenizer, *, num_image_tokens: int, clip_size: int, sam_size: int,
                 rank: int, world_size: int, seed: int, start_step: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.num_image_tokens, self.clip_size, self.sam_size = num_image_tokens, clip_size, sam_size
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self.sources = [s for s in cfg.train if s.weight > 0]
        if not self.sources:
            raise ValueError("data.train has no source with weight > 0")
        self.shards = [_manifest_shards(s) for s in self.sources]  # read once, fail early
        self.num_workers = max(cfg.num_workers, 1)
        self.pad_id = _pad_id(tokenizer)
        image_token_id(tokenizer)  # fail here, not in a worker

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        role = (self.start_step + worker) % self.num_workers
        return self._batches(role)

    def _batches(self, role: int) -> Iterator[Batch]:
        slot, num_slots = self.rank * self.num_workers + role, self.world_size * self.num_workers
        decode = Decoder(self.tokenizer, self.num_image_tokens, self.cfg.max_length)
        counter = SkipCounter(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_seen,
                              f"rank {self.rank} worker {role} (train)")
        streams = [self._source_samples(i, slot, num_slots, counter) for i in range(len(self.sources))]
        weights = [s.weight for s in self.sources]
        mix_rng = random.Random(f"mix-{self.seed}-{self.rank}-{role}")
        batch: list[Example] = []
        local = 0
        while True:
            i = mix_rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
            raw = next(streams[i])
            try:
                batch.append(decode(raw))
                counter.ok()
            except BadSample as e:
                counter.skip(self.sources[i].name, raw["__url__"], raw["__key__"], e)
                continue
            if len(batch) == self.cfg.batch_size:
                global_step = role + local * self.num_workers
                skipped = counter.take()
                if global_step >= self.start_step:
                    yield collate(batch, pad_id=self.pad_id, clip_size=self.clip_size, sam_size=self.sam_size, skipped=skipped)
                batch, local = [], local + 1

    def _source_samples(self, i: int, slot: int, num_slots: int, counter: SkipCounter) -> Iterator[dict]:
        """Raw samples of source i for this slot: shards resampled with replacement, then shuffled."""
        source = self.sources[i]
        slices = {sl.url: sl for sl in assign_slices(self.shards[i], slot, num_slots)}
        shard_seed = random.Random(f"shards-{self.seed}-{i}").getrandbits(31)
        urls = wds.ResampledShards(sorted(slices), seed=shard_seed, worker_seed=lambda: slot, deterministic=True)

        def samples() -> Iterator[dict]:
            empty_run = 0
            for item in urls:
                sl, errors, n = slices[item["url"]], [], 0
                for raw in _read_slice(sl, errors):
                    n += 1
                    yield raw
                for e in errors:
                    counter.skip(source.name, sl.url, "?", e)
                empty_run = 0 if n else empty_run + 1
                if empty_run > 10 * len(slices):
                    raise DataError(f"source {source.name!r}: shards {sorted(slices)} yield no samples")

        rng = random.Random(f"shuffle-{self.seed}-{i}-{self.rank}-{slot}")
        buf = self.cfg.shuffle_buffer
        return iter(wds.shuffle(buf, initial=buf, rng=rng)(samples())) if buf > 1 else samples()


def build_train_loader(cfg: DataConfig, tokenizer, *, num_image_tokens: int, clip_size: int, sam_size: int,
                       rank: int, world_size: int, seed: int, start_step: int = 0):
    """An iterable of Batch, forever; the launcher takes `steps` of them. Resuming needs the same
    seed, world_size, batch_size, num_workers and sources."""
    stream = TrainStream(cfg, tokenizer, num_image_tokens=num_image_tokens, clip_size=clip_size, sam_size=sam_size,
                         rank=rank, world_size=world_size, seed=seed, start_step=start_step)
    return _with_workers(stream, cfg.num_workers)


# --- eval -----------------------------------------------------------------------------------------

class EvalPass(torch.utils.data.IterableDataset):
    """One pass over cfg.val for one rank. Every slot yields exactly as many examples as the manifest
    promises (bad samples become fillers) so every rank's batch count is known in advance; ranks with
    fewer batches add one-sample filler batches up to the largest rank's count."""

    def __init__(self, cfg: DataConfig, tokenizer, *, num_image_tokens: int, clip_size: int, sam_size: int,
                 rank: int, world_size: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.num_image_tokens, self.clip_size, self.sam_size = num_image_tokens, clip_size, sam_size
        self.rank = rank
        self.pad_id = _pad_id(tokenizer)
        image_token_id(tokenizer)  # fail here, not in a worker
        if not cfg.val:
            raise ValueError("data.val lists no source to evaluate on")
        shards = [s for src in cfg.val for s in _manifest_shards(src)]
        self.num_workers = max(cfg.num_workers, 1)
        num_slots = world_size * self.num_workers
        self.slices = [assign_slices(shards, slot, num_slots) for slot in range(num_slots)]
        bs = cfg.eval_batch_size
        n_batches = [math.ceil(sum(sl.size for sl in slices) / bs) for slices in self.slices]
        per_rank = [sum(n_batches[r * self.num_workers : (r + 1) * self.num_workers]) for r in range(world_size)]
        self.num_batches = max(per_rank)
        # This rank's fillers go to its workers round-robin.
        deficit = self.num_batches - per_rank[rank]
        self.fillers = [len(range(w, deficit, self.num_workers)) for w in range(self.num_workers)]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        return self._batches(info.id if info is not None else 0)

    def _batches(self, worker: int) -> Iterator[Batch]:
        decode = Decoder(self.tokenizer, self.num_image_tokens, self.cfg.max_length)
        filler = decode.filler(self.sam_size)
        counter = SkipCounter(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_seen,
                              f"rank {self.rank} worker {worker} (eval)")

        def make(batch: list[Example]) -> Batch:
            return collate(batch, pad_id=self.pad_id, clip_size=self.clip_size, sam_size=self.sam_size,
                           skipped=counter.take())

        batch: list[Example] = []
        for ex in self._examples(self.slices[self.rank * self.num_workers + worker], decode, filler, counter):
            batch.append(ex)
            if len(batch) == self.cfg.eval_batch_size:
                yield make(batch)
                batch = []
        if batch:
            yield make(batch)
        for _ in range(self.fillers[worker]):
            yield make([filler])

    def _examples(self, slices: list[ShardSlice], decode: Decoder, filler: Example, counter: SkipCounter):
        for sl in slices:
            errors, n = [], 0
            for raw in _read_slice(sl, errors):
                n += 1
                if n > sl.size:
                    raise DataError(f"{sl.url} holds more samples than its manifest count {sl.count}")
                try:
                    ex = decode(raw)
                    counter.ok()
                    yield ex
                except BadSample as e:
                    counter.skip(sl.source, sl.url, raw["__key__"], e)
                    yield filler
            for e in errors:
                counter.skip(sl.source, sl.url, "?", e)
            for _ in range(sl.size - n):  # a truncated shard: keep the promised count
                counter.skip(sl.source, sl.url, "?", BadSample("missing", "shard ended before its manifest count"))
                yield filler


def build_eval_loader(cfg: DataConfig, tokenizer, *, num_image_tokens: int, clip_size: int, sam_size: int,
                      rank: int, world_size: int):
    """One deterministic pass over cfg.val; len() is the batch count, the same on every rank."""
    stream = EvalPass(cfg, tokenizer, num_image_tokens=num_image_tokens, clip_size=clip_size, sam_size=sam_size,
                      rank=rank, world_size=world_size)
    return _with_workers(stream, cfg.num_workers)


# --- shared ---------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token)")
    return int(tokenizer.pad_token_id)


def _identity(batch: Batch) -> Batch:
    return batch


def _with_workers(dataset: torch.utils.data.IterableDataset, num_workers: int):
    if num_workers == 0:
        return dataset
    # batch_size=None: the workers batch; in-order delivery makes batch k come from worker k % W.
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity, in_order=True)
