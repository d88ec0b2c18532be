"""RefCOCO-family and gRefCOCO converters on tiny files in the real formats: masks equal pycocotools'
decoding of the source polygons/RLE, photos stored as their original JPEG bytes, refer ids kept in
`source`, bad records skipped and counted, deterministic and resumable shards, loadable by the trainer."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from convert_files import decode_segm, write_coco_refer

from datapipes.config import DataConfig, SourceConfig
from datapipes.convert import REGISTRY, converter_class
from datapipes.convert.common import ConvertError
from datapipes.convert.group import write_group
from datapipes.convert.run import ConvertArgs, run_conversion
from datapipes.loader import build_train_loader
from datapipes.schema import SPECIAL_TOKENS, decode_mask
from datapipes.shards import read_manifest
from datapipes.synthetic import build_tokenizer

REPO = Path(__file__).resolve().parents[1]


def convert(dataset, src, images, out, split="train", **kw) -> dict:
    options = dict(REGISTRY[dataset][1])
    args = ConvertArgs(dataset=dataset, src=str(src), images=str(images), out=str(out), split=split,
                       min_shards=kw.pop("min_shards", 3), options=options, **kw)
    return run_conversion(converter_class(dataset)(args), args)


def read_samples(out) -> dict[str, dict]:
    """key -> {"json": dict, "jpg": bytes} over the manifest's shards."""
    samples: dict[str, dict] = {}
    for s in read_manifest(out)["shards"]:
        with tarfile.open(s["url"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
    return write_coco_refer(tmp_path_factory.mktemp("coco"), n_images=6)


def test_val_split_one_sample_per_expression_with_masks_equal_to_pycocotools(refcoco, tmp_path):
    manifest = convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "val", split="val")
    samples = read_samples(tmp_path / "val")
    val_refs = [r for r in refcoco["refs"] if r["split"] == "val"]
    assert manifest["total"] == len(samples) == sum(len(r["sentences"]) for r in val_refs) == 7
    seen = set()
    for s in samples.values():
        d = s["json"]
        (ref,) = d["source"]["refs"]
        src_ref = next(r for r in val_refs if r["ref_id"] == ref["ref_id"])
        im = refcoco["images"][d["source"]["image_id"]]
        ann = refcoco["anns"][src_ref["ann_id"]]
        assert ref["ann_id"] == src_ref["ann_id"] and ref["sent_ids"] == src_ref["sent_ids"]
        assert d["source"]["split"] == "val" and d["task"] == "referring"
        expected = decode_segm(ann["segmentation"], im["height"], im["width"])
        np.testing.assert_array_equal(decode_mask(d["masks"][0]["rle"]), expected)
        assert s["jpg"] == (refcoco["image_dir"] / im["file_name"]).read_bytes()  # original bytes, no re-encode
        sent = next(x["sent"] for x in src_ref["sentences"] if x["sent_id"] == ref["sent_id"])
        assert sent in d["conversation"][0]["content"] and d["conversation"][0]["content"].startswith("<image>\n")
        seen.add(ref["sent_id"])
    assert seen == {x["sent_id"] for r in val_refs for x in r["sentences"]}
    assert manifest["convert"]["bytes_per_sample"] > manifest["convert"]["image_bytes_per_sample"] > 0


def test_train_samples_carry_up_to_three_expressions_interleaved_across_refs(refcoco, tmp_path):
    convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "train")
    samples = [s["json"] for s in read_samples(tmp_path / "train").values()]
    train_refs = [r for r in refcoco["refs"] if r["split"] == "train"]
    sent_ids = Counter(t["sent_id"] for d in samples for t in d["source"]["refs"])
    assert set(sent_ids) == {x["sent_id"] for r in train_refs for x in r["sentences"]} and max(sent_ids.values()) == 1
    for d in samples:
        n = len(d["source"]["refs"])
        assert 1 <= n <= 3 and len(d["masks"]) == n and len(d["conversation"]) == 2 * n
        assert sum(t["content"].count("<image>") for t in d["conversation"]) == 1
        first = d["source"]["refs"]
        if n == 3:  # the first sample of an image takes one expression of each ref
            assert len({t["ref_id"] for t in first}) == 3


def test_refcocog_umd_reads_refs_umd(refcoco, tmp_path):
    src = tmp_path / "refcocog"
    src.mkdir()
    (src / "instances.json").write_bytes((refcoco["src"] / "instances.json").read_bytes())
    (src / "refs(umd).p").write_bytes((refcoco["src"] / "refs(unc).p").read_bytes())
    manifest = convert("refcocog", src, refcoco["image_dir"], tmp_path / "g", split="val")
    assert manifest["total"] == 7
    assert {s["json"]["source"]["split_by"] for s in read_samples(tmp_path / "g").values()} == {"umd"}
    with pytest.raises(ConvertError, match=r"refs\(google\)\.p does not exist"):
        converter_class("refcocog")(ConvertArgs(dataset="refcocog", src=str(src), out=str(tmp_path / "g2"),
                                                options={"split_by": "google"}))


def test_grefcoco_multi_target_and_no_target(tmp_path):
    g = write_coco_refer(tmp_path / "coco", n_images=4, grefs=True)
    convert("grefcoco", g["src"], g["image_dir"], tmp_path / "out", split="train")
    samples = [s["json"] for s in read_samples(tmp_path / "out").values()]
    by_task = Counter(d["task"] for d in samples)
    assert set(by_task) == {"referring", "group_referring", "empty_referring"}
    for d in samples:
        im = g["images"][d["source"]["image_id"]]
        h, w = im["height"], im["width"]
        for t, m in zip(d["source"]["refs"], d["masks"]):
            ids = t["ann_id"]
            if d["task"] == "group_referring":
                assert len(ids) == 2 and len(m["instances"]) == 2
                parts = [decode_segm(g["anns"][i]["segmentation"], h, w) for i in ids]
                np.testing.assert_array_equal(decode_mask(m["rle"]), np.logical_or(*parts).astype(np.uint8))
                for inst, part in zip(m["instances"], parts):
                    np.testing.assert_array_equal(decode_mask(inst["rle"]), part)
            else:
                np.testing.assert_array_equal(decode_mask(m["rle"]), decode_segm(g["anns"][ids[0]]["segmentation"], h, w))
        if d["task"] == "empty_referring":
            assert d["masks"] == [] and all(t["ann_id"] == [-1] for t in d["source"]["refs"])
            assert all("[SEG]" not in t["content"] for t in d["conversation"])


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    g = write_coco_refer(tmp_path / "coco", n_images=10)  # train photos: 1000, 1001, 1004, 1008
    images = g["images"]
    (g["image_dir"] / images[1000]["file_name"]).unlink()  # missing image
    jpg = g["image_dir"] / images[1001]["file_name"]
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated JPEG
    inst = json.loads((g["src"] / "instances.json").read_text())
    for a in inst["annotations"]:
        if a["id"] == 112:  # image 1004's first object: a vertex far outside the photo
            a["segmentation"][0][0] = 500.0
        if a["id"] == 126:  # image 1008's RLE object: a counts string for another size
            a["segmentation"]["size"] = [a["segmentation"]["size"][0] + 1, a["segmentation"]["size"][1]]
    (g["src"] / "instances.json").write_text(json.dumps(inst))
    manifest = convert("refcoco", g["src"], g["image_dir"], tmp_path / "out", split="train", turns=1)
    bad = manifest["convert"]["bad"]
    train = lambda image_id: [r for r in g["refs"] if r["image_id"] == image_id and r["split"] == "train"]
    n_sents = lambda refs: sum(len(r["sentences"]) for r in refs)
    assert bad == {"missing_image": n_sents(train(1000)), "undecodable_image": n_sents(train(1001)),
                   "polygon_outside": n_sents([r for r in train(1004) if r["ann_id"] == 112]),
                   "rle_size_mismatch": n_sents([r for r in train(1008) if r["ann_id"] == 126])}
    total_train = n_sents([r for r in g["refs"] if r["split"] == "train"])
    assert manifest["total"] == total_train - sum(bad.values())
    lines = [json.loads(x) for x in (tmp_path / "out" / "bad_records.jsonl").read_text().splitlines()]
    assert Counter(x["reason"] for x in lines) == bad
    assert any(images[1000]["file_name"] in x["message"] for x in lines if x["reason"] == "missing_image")


def test_two_workers_write_the_same_bytes_as_one(refcoco, tmp_path):
    convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "a", workers=1, min_shards=4)
    convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "b", workers=2, min_shards=4)
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(tars) == 4
    assert all((tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes() for t in tars)


def test_rerun_with_other_arguments_is_refused(refcoco, tmp_path):
    convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "a")
    with pytest.raises(ConvertError, match="other arguments"):
        convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "a", turns=2)


@pytest.mark.slow
def test_killed_conversion_restarted_gives_byte_identical_shards(tmp_path):
    """A real `launcher data convert` process is killed while it blocks reading one photo (a FIFO standing
    in for it); the restart keeps the finished shards untouched and writes the rest to the same bytes."""
    g = write_coco_refer(tmp_path / "coco", n_images=8)
    cmd = lambda out: [sys.executable, "-m", "launcher", "data", "convert", "refcoco", "--src", str(g["src"]),
                       "--images", str(g["image_dir"]), "--out", str(out), "--split", "train", "--min-shards", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "ref"), check=True, cwd=REPO, env=env, capture_output=True)
    # One shard per unit here (64 > units). The FIFO replaces the photo whose first unit comes last, so
    # the shards before it are finished when the run blocks reading it.
    units = converter_class("refcoco")(ConvertArgs("refcoco", str(g["src"]), "", str(g["image_dir"]), "train",
                                                   options={"split_by": "unc"})).units()
    n_shards = len(units)
    first = {}
    for j, (_, payload) in enumerate(units):
        first.setdefault(payload[0], j)
    victim, n_done = max(first.items(), key=lambda kv: kv[1])
    assert n_done >= 2
    photo = g["image_dir"] / g["images"][victim]["file_name"]
    original = photo.read_bytes()
    photo.unlink()
    os.mkfifo(photo)
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("*.stats.json"))) < n_done and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    assert proc.poll() is None, "the conversion should be blocked on the FIFO"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.stats.json"))) == n_done
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    photo.unlink()
    photo.write_bytes(original)
    subprocess.run(cmd(out), check=True, cwd=REPO, env=env, capture_output=True)
    for name, stamp in before.items():  # finished shards were not rewritten
        assert (out / name).stat().st_ino == stamp[0] and (out / name).stat().st_mtime_ns == stamp[1]
    tars = sorted(p.name for p in (tmp_path / "ref").glob("*.tar"))
    assert tars == sorted(p.name for p in out.glob("*.tar")) and len(tars) == n_shards
    assert all((out / t).read_bytes() == (tmp_path / "ref" / t).read_bytes() for t in tars)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == json.loads((tmp_path / "ref" / "manifest.json").read_text())["total"]
    assert manifest["convert"]["shards_reused"] == n_done
    keys = []
    for t in tars:
        with tarfile.open(out / t) as tar:
            keys += tar.getnames()
    assert len(keys) == len(set(keys))  # no duplicates


def test_converted_sets_grouped_load_through_the_training_loader(refcoco, tmp_path):
    """refcoco train + val converted, grouped into one folder (as refer_seg is), read by datapipes.loader."""
    a = convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "refcoco_train")
    b = convert("refcoco", refcoco["src"], refcoco["image_dir"], tmp_path / "refcoco_val", split="val")
    group = write_group(tmp_path / "refer_seg", [tmp_path / "refcoco_train", tmp_path / "refcoco_val"])
    assert group["total"] == a["total"] + b["total"] and len(group["shards"]) == len(a["shards"]) + len(b["shards"])
    assert all(s["url"].startswith("../refcoco_") for s in group["shards"])
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    cfg = DataConfig(train=[SourceConfig(name="refer_seg", path=str(tmp_path / "refer_seg"))], val=[], batch_size=2,
                     num_workers=0, max_length=200)
    loader = build_train_loader(cfg, tok, num_image_tokens=4, clip_size=32, sam_size=48, rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    assert batch.sam_pixels.shape == (2, 3, 48, 48) and batch.tasks == ["referring", "referring"]
    assert all(m.shape[0] >= 1 and m.any() for m in batch.gt_masks)
    assert batch.skipped == {}
