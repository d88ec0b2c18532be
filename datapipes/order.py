"""Which raw sample a train reader slot (rank x worker) reads at each position, computed from the
manifests' per-shard counts alone: so a resumed run starts at any step by arithmetic plus one scan of
tar headers per open shard, and never reads, let alone decodes, a sample before it.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from datapipes.schema import BadSample

MIX_CHUNK = 4096  # draws per mixing generator: any range of draws costs O(range / MIX_CHUNK) to find
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member name into key and extension
_TAGS = {"mix": 1, "epoch": 2, "visit": 3, "spare": 4}  # keep the generators of different jobs apart


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


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# --- one shard, addressed by sample index -----------------------------------------------------------

class TarIndex:
    """Where each sample's members lie in a tar shard, from its headers alone (tarfile seeks over the
    payloads). Samples are grouped by key in file order, as webdataset groups them. A shard cut short
    ends the list early; `error` says why, and the missing indices read as bad samples (reason "tar")."""

    scans = 0  # shards indexed by this process (what a resume costs besides arithmetic)

    def __init__(self, url: str):
        TarIndex.scans += 1
        self.url = url
        self.samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
        self.error: str | None = None
        try:
            size = os.path.getsize(url)
            with tarfile.open(url, "r:") as tf:
                for member in tf:
                    match = _KEY_EXT.match(member.name) if member.isfile() else None
                    if match is None:
                        continue
                    key, ext = match.groups()
                    if member.offset_data + member.size > size:
                        if self.samples and self.samples[-1][0] == key:
                            self.samples.pop()  # a sample with a member cut off is incomplete
                        raise tarfile.ReadError(f"member {member.name} is cut short (file is {size} bytes)")
                    if not self.samples or self.samples[-1][0] != key:
                        self.samples.append((key, {}))
                    self.samples[-1][1][ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"

    def read(self, index: int, count: int) -> dict:
        """The raw sample (webdataset's dict of bytes) at `index`; BadSample('tar') when the shard holds
        fewer samples than its manifest `count` promises."""
        if index >= len(self.samples):
            why = f"; {self.error}" if self.error else ""
            raise BadSample("tar", f"{self.url}: sample {index} is missing ({len(self.samples)} readable of "
                                   f"the manifest's {count}{why})")
        key, members = self.samples[index]
        raw: dict = {"__key__": key, "__url__": self.url}
        try:  # the shard may have been deleted or cut short since its headers were read
            with open(self.url, "rb") as f:
                for ext, (offset, size) in members.items():
                    f.seek(offset)
                    raw[ext] = f.read(size)
                    if len(raw[ext]) != size:
                        raise OSError(f"member {key}.{ext} is cut short ({len(raw[ext])} of {size} bytes)")
        except OSError as e:
            raise BadSample("tar", f"{self.url}: sample {index} ({key}) unreadable: {e}") from None
        return raw


# --- one source, addressed by position --------------------------------------------------------------

class SourceOrder:
    """The endless sample order of one source for one slot. Position p belongs to lane p % L, the
    lanes being L shards of the source read at once (their samples interleave). A lane reads the
    slot's shard slices epoch by epoch, each epoch in a fresh permutation of the slices and each
    slice in a fresh permutation of its samples, all drawn from (seed, source, slot, lane, epoch)."""

    def __init__(self, index: int, slices: list[ShardSlice], *, seed: int, slot: int, lanes: int):
        self.index, self.slices, self.seed, self.slot, self.lanes = index, slices, seed, slot, max(lanes, 1)
        self.sizes = np.array([sl.size for sl in slices], dtype=np.int64)
        self.total = int(self.sizes.sum())
        self._shards: OrderedDict[str, TarIndex] = OrderedDict()  # the last few scanned shards
        self._perms: dict[tuple, np.ndarray] = {}
        self._visit: dict[int, tuple[tuple, np.ndarray]] = {}

    def locate(self, position: int) -> tuple[ShardSlice, int]:
        """The slice and the sample index in its shard at `position` (no file is touched)."""
        lane, lane_pos = position % self.lanes, position // self.lanes
        epoch, offset = divmod(lane_pos, self.total)
        key = (lane, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != lane}  # one epoch per lane kept
            self._perms[key] = _rng(self.seed, _TAGS["epoch"], self.index, self.slot, lane, epoch).permutation(len(self.slices))
        order = self._perms[key]
        ends = np.cumsum(self.sizes[order])
        j = int(np.searchsorted(ends, offset, side="right"))
        offset -= int(ends[j - 1]) if j else 0
        sl = self.slices[order[j]]
        visit = (lane, epoch, j)
        if self._visit.get(lane, (None,))[0] != visit:  # one visit's permutation per lane kept
            self._visit[lane] = (visit, _rng(self.seed, _TAGS["visit"], self.index, self.slot, *visit).permutation(sl.size))
        return sl, sl.residue + int(self._visit[lane][1][offset]) * sl.modulo

    def read(self, position: int) -> dict:
        sl, index = self.locate(position)
        return self.shard(sl.url).read(index, sl.count)

    def shard(self, url: str) -> TarIndex:
        if url not in self._shards:
            self._shards[url] = TarIndex(url)
            while len(self._shards) > self.lanes + 1:
                self._shards.popitem(last=False)
        self._shards.move_to_end(url)
        return self._shards[url]


# --- the mixture of sources -------------------------------------------------------------------------

class Mixture:
    """Which source each draw of one (rank, worker) slot comes from, by weight. Draw d belongs to chunk
    d // MIX_CHUNK, whose generator is keyed by (seed, rank, worker, chunk): any draw, and the number of
    draws each source had before it, is found without stepping through the ones before."""

    def __init__(self, weights: list[float], *, seed: int, rank: int, worker: int):
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.seed, self.rank, self.worker = seed, rank, worker

    def chunk(self, c: int) -> np.ndarray:
        return _rng(self.seed, _TAGS["mix"], self.rank, self.worker, c).choice(len(self.p), size=MIX_CHUNK, p=self.p)

    def draws(self, start: int, n: int) -> np.ndarray:
        """The sources of draws start .. start + n - 1."""
        first, last = start // MIX_CHUNK, (start + n - 1) // MIX_CHUNK
        out = np.concatenate([self.chunk(c) for c in range(first, last + 1)]) if n else np.zeros(0, np.int64)
        return out[start - first * MIX_CHUNK :][:n]

    def positions(self, draws: int) -> list[int]:
        """How many of the first `draws` draws came from each source: the sources' positions there."""
        full, rest = divmod(draws, MIX_CHUNK)
        counts = sum((np.bincount(self.chunk(c), minlength=len(self.p)) for c in range(full)), np.zeros(len(self.p), np.int64))
        if rest:
            counts = counts + np.bincount(self.chunk(full)[:rest], minlength=len(self.p))
        return [int(x) for x in counts]

    def spare(self, step: int, attempt: int, totals: list[int]) -> tuple[int, int]:
        """A (source, position) to read when every draw of a batch was bad: random, keyed by the step."""
        rng = _rng(self.seed, _TAGS["spare"], self.rank, self.worker, step, attempt)
        source = int(rng.choice(len(self.p), p=self.p))
        return source, int(rng.integers(totals[source]))
