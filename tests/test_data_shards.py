"""Shard writing: samples come back pixel- and JSON-identical; the manifest counts what was written."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datapipes.schema import Sample, decode_mask, mask_ann
from datapipes.shards import ManifestError, inspect, read_manifest, write_shards


def make_samples(n: int):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = 12 + i % 3, 20
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        masks = [(rng.random((h, w)) < 0.3).astype(np.uint8) for _ in range(1 + i % 3)]
        answer = "Sure, " + " and ".join(f"<p> thing {j} </p> [SEG]" for j in range(len(masks))) + "."
        sample = Sample(
            task="multi_referring",
            conversation=[{"role": "user", "content": "<image>\nSegment things."}, {"role": "assistant", "content": answer}],
            masks=[mask_ann(m, f"thing {j}") for j, m in enumerate(masks)],
            image_size=[h, w],
            source={"dataset": "test", "id": str(i)},
            extra={"i": i},
        )
        out.append((f"k{i:04d}", image, sample, masks))
    return out


def test_round_trip_is_pixel_and_json_identical(tmp_path):
    samples = make_samples(25)
    manifest = write_shards(((k, img, s) for k, img, s, _ in samples), tmp_path, maxcount=10)
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["total"] == 25
    urls = [s["url"] for s in read_manifest(tmp_path)["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in read] == [k for k, *_ in samples]
    for r, (key, image, sample, masks) in zip(read, samples):
        d = json.loads(r["json"])
        assert d == sample.to_dict()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r["png"]))), image)
        for m, ann in zip(masks, d["masks"]):
            np.testing.assert_array_equal(decode_mask(ann["rle"]), m)


def test_manifest_counts_match_the_tar_contents(tmp_path):
    samples = make_samples(7)
    write_shards(((k, img, s) for k, img, s, _ in samples), tmp_path, maxcount=3)
    for shard in read_manifest(tmp_path)["shards"]:
        n = sum(1 for _ in wds.WebDataset(shard["url"], shardshuffle=False, empty_check=False))
        assert n == shard["count"]


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json in"):
        read_manifest(tmp_path)


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"shards": [{"url": "a.tar"')
    with pytest.raises(ManifestError, match="corrupt"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"url": "a.tar", "count": 3}], "total": 4}))
    with pytest.raises(ManifestError, match="total 4 != sum of shard counts 3"):
        read_manifest(tmp_path)


def test_manifest_naming_a_missing_shard_is_an_error(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"url": "a.tar", "count": 3}], "total": 3}))
    with pytest.raises(ManifestError, match="a.tar, which does not exist"):
        read_manifest(tmp_path)


def test_key_with_a_dot_is_refused(tmp_path):
    (key, img, s, _), = make_samples(1)
    with pytest.raises(ValueError, match="contains a dot"):
        write_shards([("a.b", img, s)], tmp_path, maxcount=10)


def test_inspect_shows_counts_and_first_conversations(tmp_path):
    samples = make_samples(4)
    write_shards(((k, img, s) for k, img, s, _ in samples), tmp_path, maxcount=10)
    text = inspect(tmp_path, n=2)
    assert "4 samples in 1 shards" in text
    assert "k0000" in text and "k0001" in text and "k0002" not in text
