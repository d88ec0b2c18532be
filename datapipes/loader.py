"""The streaming loaders: WebDataset shards -> decoded, validated, tokenised examples -> Batch.
Train: weighted-mixed, shuffled, resumable at any step without reading the samples before it; eval:
one pass, every sample once, the same batch count on every rank. Bad samples are skipped and counted.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from datapipes.collate import Batch, Example, collate
from datapipes.config import DataConfig, SourceConfig
from datapipes.order import Mixture, ShardSlice, SourceOrder, assign_slices
from datapipes.schema import IMAGE_TOKEN, SEG_TOKEN, BadSample, Sample, decode_mask
from datapipes.shards import read_manifest
from datapipes.text import fit_conversation, image_token_id, tokenize_conversation

# Workers are forked after the main process may have used the tokenizer; its thread pool must not be.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
IMAGE_EXTS = ("jpg", "jpeg", "png")
# Why a sample was skipped. "too_long" is a valid sample that no cut makes fit; the others are corrupt.
REASONS = ("tar", "json", "image", "mask", "invalid", "missing", "too_long")


class DataError(RuntimeError):
    """The data is too broken to train on (too many bad samples, or a shard that disagrees with its manifest)."""


# --- reading shards ------------------------------------------------------------------------------

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
    """Raw tar sample -> Example, or BadSample naming why not. A JPEG much larger than the SAM frame
    is decoded at a reduced size in the DCT domain (PIL draft: 1/2, 1/4 or 1/8), never below what the
    CLIP and SAM resizes need; masks stay at the stored size. Too-long conversations are cut
    (datapipes/text.py); `cut` counts those."""

    tokenizer: object
    num_image_tokens: int
    max_length: int
    target_side: int = 0  # the longest side the image is resized to (SAM's frame); 0: decode at full size
    min_side: int = 0  # ...and the side both image sides are resized to at least (CLIP's)

    def __post_init__(self) -> None:
        self.image_id = image_token_id(self.tokenizer)
        self.cut = 0

    def __call__(self, raw: dict) -> Example:
        if "json" not in raw:
            raise BadSample("missing", f"sample {raw.get('__key__')} has no .json")
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("missing", f"sample {raw.get('__key__')} has no image (.jpg/.png)")
        sample = Sample.from_json(raw["json"])
        h, w = sample.image_size
        image = self.decode_image(raw[ext], h, w)
        tokens, conversation = fit_conversation(
            sample.conversation, self.tokenizer, image_id=self.image_id,
            num_image_tokens=self.num_image_tokens, max_length=self.max_length,
        )
        if conversation is not sample.conversation:  # cut: the masks of the [SEG]s cut away go too
            self.cut += 1
            kept = sum(t["content"].count(SEG_TOKEN) for t in conversation if t["role"] == "assistant")
            sample.masks = sample.masks[:kept]
        try:
            masks = np.stack([_decode(m.rle, h, w) for m in sample.masks]) if sample.masks else np.zeros((0, h, w), np.uint8)
            example = Example(raw["__key__"], sample.task, image, masks, tokens, sample.extra, hw=(h, w), sample=sample)
            if any(m.rle is None or m.instances for m in sample.masks):  # box-only or set targets
                _add_instances(example, sample, h, w)
        except BadSample as e:
            raise BadSample("mask", str(e)) from e
        return example

    def decode_image(self, data: bytes, h: int, w: int) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            if (image.height, image.width) != (h, w):
                raise BadSample("image", f"image is {image.height}x{image.width}, its JSON says {h}x{w}")
            if self.target_side and image.format == "JPEG":
                scale = self.target_side / max(h, w)
                need = (max(math.ceil(w * scale), self.min_side), max(math.ceil(h * scale), self.min_side))
                image.draft("RGB", need)  # picks the largest DCT reduction still >= need (none for COCO photos)
            return image.convert("RGB")  # decodes
        except BadSample:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise BadSample("image", f"image does not decode: {e}") from e

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
    """Counts seen and skipped samples of one worker by source and reason; raises DataError past the
    allowed rate. `take()` hands the counts since the last batch to that batch."""

    def __init__(self, max_bad_fraction: float, min_seen: int, where: str):
        self.max_bad_fraction, self.min_seen, self.where = max_bad_fraction, min_seen, where
        self.seen = 0
        self.bad: dict[str, Counter] = {}  # source -> reason -> count
        self.last: dict[str, str] = {}  # source -> the last bad sample, for the error message
        self.pending: Counter = Counter()  # "source/reason" -> count, since the last batch

    def ok(self) -> None:
        self.seen += 1

    def skip(self, source: str, url: str, key: str, err: BadSample | Exception) -> None:
        reason = getattr(err, "reason", "tar")
        self.seen += 1
        self.bad.setdefault(source, Counter())[reason] += 1
        self.pending[f"{source}/{reason}"] += 1
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
    global batches r, r + W, r + 2W, ... so in-order delivery gives start_step, start_step + 1, ...

    Local batch b of a role is the draws b*B .. b*B + B - 1 of its Mixture, each read from its
    source's SourceOrder at that source's next position. A bad sample leaves its batch one short (a
    batch whose every draw is bad reads spares), so what batch b holds never depends on how earlier
    batches decoded: a resume at any step starts there directly (datapipes/order.py)."""

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
        if rank == 0:
            for line in slot_warnings(self.sources, self.shards, world_size * self.num_workers):
                print(f"[segcap] WARNING data: {line}", file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        role = (self.start_step + worker) % self.num_workers
        return self._batches(role)

    def _batches(self, role: int) -> Iterator[Batch]:
        slot, num_slots = self.rank * self.num_workers + role, self.world_size * self.num_workers
        decode = Decoder(self.tokenizer, self.num_image_tokens, self.cfg.max_length, target_side=self.sam_size,
                         min_side=self.clip_size)
        counter = SkipCounter(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_seen,
                              f"rank {self.rank} worker {role} (train)")
        orders = [SourceOrder(i, assign_slices(self.shards[i], slot, num_slots), seed=self.seed, slot=slot,
                              lanes=self.cfg.open_shards) for i in range(len(self.sources))]
        for order, source in zip(orders, self.sources):
            if order.total == 0:
                raise DataError(f"source {source.name!r}: reader slot {slot} has no samples ({source.path})")
        mix = Mixture([s.weight for s in self.sources], seed=self.seed, rank=self.rank, worker=role)
        bs, w = self.cfg.batch_size, self.num_workers
        local = max(0, -(-(self.start_step - role) // w))  # the first local batch at or after start_step
        positions = mix.positions(local * bs)
        while True:
            step = role + local * w
            batch: list[Example] = []
            for i in mix.draws(local * bs, bs):
                batch += self._read(decode, counter, orders[i], self.sources[i].name, positions[i])
                positions[i] += 1
            attempt = 0
            while not batch:  # every draw was bad: spares keep the batch from being empty
                i, position = mix.spare(step, attempt, [o.total for o in orders])
                batch += self._read(decode, counter, orders[i], self.sources[i].name, position)
                attempt += 1
                if attempt > 100 * bs:
                    raise DataError(f"rank {self.rank} worker {role}: batch {step} found no good sample in "
                                    f"{bs} draws and {attempt} spares")
            cut, decode.cut = decode.cut, 0
            yield collate(batch, pad_id=self.pad_id, clip_size=self.clip_size, sam_size=self.sam_size,
                          skipped=counter.take(), cut=cut, normalize=not self.cfg.normalize_on_device,
                          clip_pad=self.cfg.clip_frame == "pad")
            local += 1

    @staticmethod
    def _read(decode: Decoder, counter: SkipCounter, order: SourceOrder, name: str, position: int) -> list[Example]:
        raw: dict = {}
        try:
            raw = order.read(position)
            example = decode(raw)
        except BadSample as e:
            counter.skip(name, raw.get("__url__", "?"), raw.get("__key__", f"position {position}"), e)
            return []
        counter.ok()
        return [example]


def slot_warnings(sources: list[SourceConfig], shards: list[list], num_slots: int) -> list[str]:
    """One line per source with fewer shards than reader slots (ranks x workers)."""
    return [
        f"source {src.name!r} has {len(sh)} shard(s) for {num_slots} reader slots (ranks x workers): slots share "
        f"shards, each reading every {math.ceil(num_slots / len(sh))}-th sample of one, and every slot scans that "
        f"whole shard's tar headers; write at least {num_slots} shards ({src.path})"
        for src, sh in zip(sources, shards) if len(sh) < num_slots
    ]


def build_train_loader(cfg: DataConfig, tokenizer, *, num_image_tokens: int, clip_size: int, sam_size: int,
                       rank: int, world_size: int, seed: int, start_step: int = 0):
    """An iterable of Batch, forever; the launcher takes `steps` of them. Resuming needs the same
    seed, world_size, batch_size, num_workers, open_shards and sources."""
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
        decode = Decoder(self.tokenizer, self.num_image_tokens, self.cfg.max_length, target_side=self.sam_size,
                         min_side=self.clip_size)
        filler = decode.filler(self.sam_size)
        counter = SkipCounter(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_seen,
                              f"rank {self.rank} worker {worker} (eval)")

        def make(batch: list[Example]) -> Batch:
            cut, decode.cut = decode.cut, 0
            return collate(batch, pad_id=self.pad_id, clip_size=self.clip_size, sam_size=self.sam_size,
                           skipped=counter.take(), cut=cut, clip_pad=self.cfg.clip_frame == "pad")

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
