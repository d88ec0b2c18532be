"""The train read order (datapipes/order.py): weighted mixing deterministic in (seed, rank, worker) and
within 2% of the weights, positions found without stepping through earlier draws, every sample once
per epoch, and tar shards read by member offset from their headers, a cut-short shard included."""

import json

import numpy as np
import pytest
import webdataset as wds

from datapipes.order import (
    MIX_CHUNK,
    Mixture,
    ShardSlice,
    SourceOrder,
    TarIndex,
    assign_slices,
)
from datapipes.schema import BadSample


def test_mixture_is_within_2_percent_of_the_weights_over_10k_samples():
    weights = [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]  # stage 2's mixture
    for rank, worker in [(0, 0), (5, 3)]:
        share = np.bincount(Mixture(weights, seed=11, rank=rank, worker=worker).draws(0, 10_000), minlength=6) / 10_000
        assert np.abs(share - np.array(weights) / sum(weights)).max() < 0.02, share


def test_mixture_is_deterministic_in_seed_rank_and_worker():
    def draws(seed, rank, worker):
        return Mixture([1, 1, 2], seed=seed, rank=rank, worker=worker).draws(0, 500).tolist()

    assert draws(1, 0, 0) == draws(1, 0, 0)
    others = [draws(2, 0, 0), draws(1, 1, 0), draws(1, 0, 1)]
    assert all(o != draws(1, 0, 0) for o in others)


def test_mixture_positions_and_ranges_agree_with_counting_every_draw():
    mix = Mixture([2, 1, 1], seed=3, rank=1, worker=2)
    n = 2 * MIX_CHUNK + 123
    every = mix.draws(0, n)
    assert mix.positions(n) == np.bincount(every, minlength=3).tolist()
    assert mix.draws(MIX_CHUNK - 5, 20).tolist() == every[MIX_CHUNK - 5 : MIX_CHUNK + 15].tolist()


def test_source_order_reads_every_sample_once_per_epoch_of_each_lane():
    slices = [ShardSlice("s", f"u{i}", count=c) for i, c in enumerate([5, 7, 3])]
    order = SourceOrder(0, slices, seed=1, slot=0, lanes=2)
    first = [order.locate(p) for p in range(0, 2 * 15, 2)]  # lane 0's first epoch
    assert sorted((sl.url, i) for sl, i in first) == sorted((f"u{j}", i) for j, c in enumerate([5, 7, 3]) for i in range(c))
    second = [order.locate(p) for p in range(2 * 15, 4 * 15, 2)]
    assert [(sl.url, i) for sl, i in second] != [(sl.url, i) for sl, i in first]  # a new permutation each epoch
    fresh = SourceOrder(0, slices, seed=1, slot=0, lanes=2)
    assert fresh.locate(37) == order.locate(37)  # a position is found directly, in a fresh object


def test_shared_shard_slices_are_disjoint_and_cover_it():
    slices = [assign_slices([("s", "only.tar", 10)], slot, 3)[0] for slot in range(3)]
    picked = [sl.residue + k * sl.modulo for sl in slices for k in range(sl.size)]
    assert sorted(picked) == list(range(10))


def write_tar(path, n):
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            w.write({"__key__": f"k{i:03d}", "jpg": bytes([i]) * (700 + i), "json": json.dumps({"i": i}).encode()})


def test_tar_index_reads_the_same_samples_as_webdataset(tmp_path):
    write_tar(tmp_path / "a.tar", 6)
    index = TarIndex(str(tmp_path / "a.tar"))
    reference = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False, empty_check=False))
    assert index.error is None and len(index.samples) == 6
    for i, ref in enumerate(reference):
        raw = index.read(i, 6)
        assert raw["__key__"] == ref["__key__"] and raw["jpg"] == ref["jpg"] and raw["json"] == ref["json"]


def test_cut_short_shard_reads_its_whole_samples_and_reports_the_rest_as_tar(tmp_path):
    write_tar(tmp_path / "a.tar", 6)
    data = (tmp_path / "a.tar").read_bytes()
    index_full = TarIndex(str(tmp_path / "a.tar"))
    offset, _ = index_full.samples[4][1]["jpg"]  # cut inside sample 4's image
    (tmp_path / "cut.tar").write_bytes(data[: offset + 100])
    index = TarIndex(str(tmp_path / "cut.tar"))
    assert [k for k, _ in index.samples] == ["k000", "k001", "k002", "k003"]
    assert "cut short" in index.error
    assert index.read(3, 6)["jpg"] == bytes([3]) * 703
    with pytest.raises(BadSample, match=r"sample 4 is missing \(4 readable of the manifest's 6") as e:
        index.read(4, 6)
    assert e.value.reason == "tar"
