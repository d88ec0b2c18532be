"""Shards that change under a running loader: a shard deleted or cut short after its tar headers were
read. Every sample read from it afterwards is a counted "tar" skip (exactly one per failed read), the
batches stay full, and nothing escapes. (Corrupt members through a 2-rank run: test_data_corrupt.py.)"""

import itertools
import json
import os

import pytest
import webdataset as wds

from datapipes.config import DataConfig, SourceConfig, SyntheticConfig
from datapipes.loader import build_train_loader
from datapipes.order import SourceOrder, TarIndex
from datapipes.schema import SPECIAL_TOKENS, BadSample
from datapipes.synthetic import build_tokenizer, write_synthetic

SIZES = {"num_image_tokens": 16, "clip_size": 32, "sam_size": 48}


def test_shard_cut_short_or_deleted_after_indexing_reads_as_tar_skips(tmp_path):
    path = tmp_path / "a.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(6):
            w.write({"__key__": f"k{i}", "jpg": bytes([i]) * 700, "json": json.dumps({"i": i}).encode()})
    index = TarIndex(str(path))
    offset, _ = index.samples[4][1]["jpg"]
    os.truncate(path, offset + 100)  # cut inside sample 4's image, after the headers were read
    assert index.read(3, 6)["jpg"] == bytes([3]) * 700
    with pytest.raises(BadSample, match=r"sample 4 \(k4\) unreadable: member k4.jpg is cut short \(100 of 700") as e:
        index.read(4, 6)
    assert e.value.reason == "tar"
    path.unlink()
    with pytest.raises(BadSample, match="No such file") as e:
        index.read(0, 6)
    assert e.value.reason == "tar"


def test_shard_deleted_mid_run_is_skipped_and_counted_exactly(tmp_path, monkeypatch):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    train, _ = write_synthetic(SyntheticConfig(out_dir=str(tmp_path), num_train=120, num_val=4, samples_per_shard=30))
    cfg = DataConfig(train=[SourceConfig(name="syn", path=str(train))], val=[], batch_size=4, num_workers=0,
                     max_bad_fraction=0.6)  # a quarter of the data goes: past the default 1%, DataError stops a run
    reads = []  # (url, failed) of every sample read, recorded around the real read
    real_read = SourceOrder.read

    def read(self, position):
        url = self.locate(position)[0].url
        try:
            raw = real_read(self, position)
        except BadSample:
            reads.append((url, True))
            raise
        reads.append((url, False))
        return raw

    monkeypatch.setattr(SourceOrder, "read", read)
    stream = iter(build_train_loader(cfg, tok, rank=0, world_size=1, seed=0, **SIZES))
    before = list(itertools.islice(stream, 3))
    victim = reads[-1][0]  # a shard the loader has open (its index is cached)
    os.unlink(victim)
    n_before = len(reads)
    after = list(itertools.islice(stream, 12))
    failed = [u for u, bad in reads[n_before:] if bad]
    assert failed and set(failed) == {victim}, "the deleted shard must be read again after deletion"
    assert not any(bad for u, bad in reads[n_before:] if u != victim)
    skipped = sum(b.skipped.get("syn/tar", 0) for b in after)
    assert skipped == len(failed)
    assert sum(sum(b.skipped.values()) for b in before) == 0
    good = sum(not bad for _, bad in reads[n_before:])
    assert sum(b.input_ids.shape[0] for b in after) == good  # every good read is trained on, the bad ones only counted
    assert all(b.input_ids.shape[0] >= 1 for b in after)
