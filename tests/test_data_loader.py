"""The streaming loaders on real shards: eval covers every sample once with equal batch counts per
rank; the train stream resumes exactly; ranks differ; bad samples are skipped, counted, and past the
configured rate stop the run with an error that says why."""

import io
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from datapipes.collate import Batch
from datapipes.config import DataConfig, SourceConfig, SyntheticConfig
from datapipes.loader import DataError, build_eval_loader, build_train_loader
from datapipes.schema import SPECIAL_TOKENS
from datapipes.shards import read_manifest, write_shards
from datapipes.synthetic import build_tokenizer, generate, write_synthetic

SIZES = dict(num_image_tokens=16, clip_size=32, sam_size=48)


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return t


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    # 8 train shards of 60; val: 3 shards (20, 20, 10), fewer than 2 ranks x 2 workers.
    cfg = SyntheticConfig(out_dir=str(out), num_train=480, num_val=50, samples_per_shard=60)
    train, _ = write_synthetic(cfg)
    val = out / "val3"
    write_shards(generate(50, seed=99, prefix="val"), val, maxcount=20)
    return train, str(val)


def config(train_path, val_path, **kw) -> DataConfig:
    base = dict(train=[SourceConfig(name="syn", path=train_path)], val=[SourceConfig(name="syn_val", path=val_path)],
                batch_size=4, eval_batch_size=8, num_workers=0)
    return DataConfig(**{**base, **kw})


def keys_on_disk(folder) -> list[str]:
    urls = [s["url"] for s in read_manifest(folder)["shards"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def eval_pass(cfg, tok, rank, world_size) -> list[Batch]:
    return list(build_eval_loader(cfg, tok, rank=rank, world_size=world_size, **SIZES))


def train_batches(cfg, tok, n, rank=0, world_size=1, seed=0, start_step=0) -> list[Batch]:
    loader = build_train_loader(cfg, tok, rank=rank, world_size=world_size, seed=seed, start_step=start_step, **SIZES)
    return list(itertools.islice(iter(loader), n))


# --- eval ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_two_ranks_same_batch_count_every_sample_exactly_once(data, tok, num_workers):
    _, val = data
    cfg = config(*data, num_workers=num_workers)
    per_rank = [eval_pass(cfg, tok, rank, 2) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = [k for batches in per_rank for b in batches for k, pad in zip(b.keys, b.is_padding) if not pad]
    assert len(seen) == len(set(seen))  # no sample twice across ranks and workers
    assert sorted(seen) == sorted(keys_on_disk(val))  # and none missing


def test_eval_rank_without_samples_yields_only_fillers_in_step(tmp_path, tok, data):
    write_shards(generate(3, seed=1, prefix="tiny"), tmp_path, maxcount=10)
    cfg = config(data[0], str(tmp_path), eval_batch_size=2)
    per_rank = [eval_pass(cfg, tok, rank, 4) for rank in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert per_rank[3][0].is_padding.all() and per_rank[3][0].tasks == ["padding"]
    real = [k for batches in per_rank for b in batches for k, p in zip(b.keys, b.is_padding) if not p]
    assert sorted(real) == ["tiny0000000", "tiny0000001", "tiny0000002"]


def test_eval_pass_is_deterministic(data, tok):
    cfg = config(*data)
    a, b = eval_pass(cfg, tok, 0, 1), eval_pass(cfg, tok, 0, 1)
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.sam_pixels, y.sam_pixels) for x, y in zip(a, b))


# --- batch layout -------------------------------------------------------------------------------

def test_batch_matches_the_interface(data, tok):
    (b,) = train_batches(config(*data), tok, 1)
    n, t = b.input_ids.shape
    assert n == 4 and b.attention_mask.shape == b.labels.shape == (n, t)
    assert b.clip_pixels.shape == (n, 3, 32, 32) and b.sam_pixels.shape == (n, 3, 48, 48)
    assert b.image_sizes.tolist() == [[48, 48]] * n  # 64x64 images, longest side -> 48
    seg = tok.convert_tokens_to_ids("[SEG]")
    img = tok.convert_tokens_to_ids("<image>")
    for i in range(n):
        length = int(b.attention_mask[i].sum())
        assert (b.input_ids[i, length:] == tok.pad_token_id).all() and (b.labels[i, length:] == -100).all()
        assert int((b.input_ids[i] == seg).sum()) == b.gt_masks[i].shape[0]
        assert b.gt_masks[i].dtype == torch.uint8 and b.gt_masks[i].shape[1:] == (48, 48)
        assert int((b.input_ids[i] == img).sum()) == 16
        assert torch.equal(b.input_ids[i, : len(b.prompt_ids[i])], b.prompt_ids[i])
    assert set(b.model_inputs()) == {"input_ids", "attention_mask", "labels", "clip_pixels", "sam_pixels", "gt_masks"}
    assert not b.is_padding.any() and b.skipped == {}
    assert b.to("cpu").keys == b.keys


def test_sam_frame_pads_bottom_right_and_masks_follow_the_image(tmp_path, tok, data):
    # A 30x60 image: longest side -> 48 gives 24x48 inside the 48x48 frame.
    from datapipes.schema import Sample, mask_ann

    image = np.full((30, 60, 3), 200, np.uint8)
    mask = np.zeros((30, 60), np.uint8)
    mask[10:20, 30:60] = 1
    s = Sample("referring", [{"role": "user", "content": "<image>\nPlease segment the red square."},
                             {"role": "assistant", "content": "Sure, <p> the red square </p> [SEG]."}],
               [mask_ann(mask, "the red square")], [30, 60], {"dataset": "t", "id": "0"})
    write_shards([("wide", image, s)], tmp_path, maxcount=10)
    (b,) = eval_pass(config(data[0], str(tmp_path)), tok, 0, 1)
    assert b.image_sizes.tolist() == [[24, 48]]
    assert (b.sam_pixels[0, :, 24:, :] == 0).all()
    expect = (200 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(b.sam_pixels[0, :, 5, 5], expect)
    gt = b.gt_masks[0][0]
    assert gt[8:16, 24:48].all() and gt.sum() == 8 * 24


# --- train --------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_equals_the_uninterrupted_one(data, tok, num_workers):
    cfg = config(*data, num_workers=num_workers)
    k, m = 3, 4
    full = train_batches(cfg, tok, k + m, seed=7)
    resumed = train_batches(cfg, tok, m, seed=7, start_step=k)
    for a, b in zip(full[k:], resumed):
        assert a.keys == b.keys
        for name in ("input_ids", "attention_mask", "labels", "clip_pixels", "sam_pixels", "image_sizes"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.gt_masks, b.gt_masks))
        assert a.skipped == b.skipped


def test_two_ranks_see_different_samples(data, tok):
    cfg = config(*data, num_workers=2)
    keys = [{k for b in train_batches(cfg, tok, 10, rank=r, world_size=2) for k in b.keys} for r in (0, 1)]
    assert len(keys[0]) >= 30 and len(keys[1]) >= 30
    assert not keys[0] & keys[1]


def test_seed_changes_the_stream(data, tok):
    cfg = config(*data)
    a = [b.keys for b in train_batches(cfg, tok, 3, seed=1)]
    assert a == [b.keys for b in train_batches(cfg, tok, 3, seed=1)]
    assert a != [b.keys for b in train_batches(cfg, tok, 3, seed=2)]


def test_sources_are_mixed_by_weight(tmp_path, tok, data):
    write_shards(generate(200, seed=1, prefix="a"), tmp_path / "a", maxcount=100)
    write_shards(generate(200, seed=2, prefix="b"), tmp_path / "b", maxcount=100)
    cfg = config(data[0], data[1], train=[SourceConfig("a", str(tmp_path / "a"), 3.0), SourceConfig("b", str(tmp_path / "b"), 1.0)])
    keys = [k for b in train_batches(cfg, tok, 100) for k in b.keys]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.68 < share < 0.82


# --- bad samples --------------------------------------------------------------------------------

def write_with_bad_samples(folder, n_good=20, after=(3, 8, 13)):
    """A shard of n_good valid samples with a corrupt PNG, a broken JSON and a [SEG]/mask mismatch in between."""
    folder.mkdir(parents=True, exist_ok=True)
    good = list(generate(n_good, seed=3, prefix="good"))
    _, img, s = good[0]
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(img).save(png, format="PNG")
    mismatch = s.to_dict()
    mismatch["masks"] = mismatch["masks"] + mismatch["masks"][:1] if mismatch["masks"] else [{"rle": {}, "box": [], "phrase": ""}]
    bad = [
        {"__key__": "badpng", "png": png.getvalue()[:60], "json": s.to_json()},
        {"__key__": "badjson", "png": png.getvalue(), "json": b'{"task": "referring", "conversation": ['},
        {"__key__": "badseg", "png": png.getvalue(), "json": json.dumps(mismatch)},
    ]
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        for i, (key, image, sample) in enumerate(good):
            w.write({"__key__": key, "png": image_bytes(image), "json": sample.to_json()})
            if i in after:
                w.write(bad.pop(0))
    total = n_good + 3
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"url": "shard-000000.tar", "count": total}], "total": total}))
    return [k for k, _, _ in good]


def image_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, tok, data):
    good = write_with_bad_samples(tmp_path / "bad")
    cfg = config(str(tmp_path / "bad"), data[1], max_bad_fraction=0.5)
    cfg.open_shards, cfg.batch_size = 1, 23  # one batch is exactly one pass over the shard's 23 samples
    (batch,) = train_batches(cfg, tok, 1)
    assert sorted(batch.keys) == sorted(good)  # the bad ones leave the batch short, not refilled
    total = Counter(batch.skipped)
    assert total == {"syn/image": 1, "syn/json": 1, "syn/invalid": 1}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_too_many_bad_samples_raise_a_data_error_naming_why(tmp_path, tok, data, num_workers):
    write_with_bad_samples(tmp_path / "bad")
    cfg = config(str(tmp_path / "bad"), data[1], max_bad_fraction=0.05, num_workers=num_workers)
    with pytest.raises(DataError) as e:
        train_batches(cfg, tok, 100)
    msg = str(e.value)
    assert "source 'syn'" in msg and "shard-000000.tar" in msg and "max_bad_fraction" in msg
    assert "'image': " in msg and "'json': " in msg and "'invalid': " in msg


def test_eval_replaces_bad_samples_with_fillers_keeping_the_count(tmp_path, tok, data):
    good = write_with_bad_samples(tmp_path / "bad")
    cfg = config(data[0], str(tmp_path / "bad"), max_bad_fraction=0.5)
    batches = eval_pass(cfg, tok, 0, 1)
    assert sum(len(b) for b in batches) == 23
    assert sorted(k for b in batches for k, p in zip(b.keys, b.is_padding) if not p) == sorted(good)
    assert sum((Counter(b.skipped) for b in batches), Counter()) == {"syn_val/image": 1, "syn_val/json": 1, "syn_val/invalid": 1}


# --- resume without replay, slots, over-length, pixels --------------------------------------------

def test_resume_at_step_k_decodes_no_sample_of_the_steps_before(data, tok, monkeypatch):
    from datapipes.loader import Decoder

    decoded = []
    real = Decoder.__call__

    def counting(self, raw):
        decoded.append(raw["__key__"])
        return real(self, raw)

    monkeypatch.setattr(Decoder, "__call__", counting)
    cfg = config(*data)
    full = train_batches(cfg, tok, 12, seed=5)
    decoded.clear()
    resumed = train_batches(cfg, tok, 2, seed=5, start_step=10)
    assert [b.keys for b in resumed] == [b.keys for b in full[10:]]
    assert all(torch.equal(a.sam_pixels, b.sam_pixels) for a, b in zip(resumed, full[10:]))
    assert decoded == [k for b in resumed for k in b.keys]  # the 40 samples of steps 0-9 were never decoded


def test_more_reader_slots_than_shards_is_said_at_start(data, tok, capsys):
    cfg = config(*data, num_workers=3)  # 4 ranks x 3 workers = 12 slots, 8 shards
    from datapipes.loader import TrainStream

    TrainStream(cfg, tok, rank=0, world_size=4, seed=0, start_step=0, **SIZES)
    err = capsys.readouterr().err
    assert "WARNING data: source 'syn' has 8 shard(s) for 12 reader slots (ranks x workers)" in err
    TrainStream(cfg, tok, rank=1, world_size=4, seed=0, start_step=0, **SIZES)  # said once, by rank 0
    TrainStream(config(*data), tok, rank=0, world_size=2, seed=0, start_step=0, **SIZES)  # 2 slots: enough
    assert capsys.readouterr().err == ""


def long_answer_sample(n_masks=3, question="Segment the stripes."):
    from datapipes.schema import Sample, mask_ann

    image = np.full((32, 32, 3), 90, np.uint8)
    masks = [np.zeros((32, 32), np.uint8) for _ in range(n_masks)]
    for i, m in enumerate(masks):
        m[i * 8 : i * 8 + 6, 2:30] = 1
    answer = "Sure, " + ", ".join(f"<p> stripe {i} </p> [SEG]" for i in range(n_masks)) + "."
    sample = Sample("multi_referring", [{"role": "user", "content": "<image>\n" + question},
                                        {"role": "assistant", "content": answer}],
                    [mask_ann(m, f"stripe {i}") for i, m in enumerate(masks)], [32, 32], {"dataset": "t", "id": "0"})
    return image, sample, masks


def raw_sample(key, image, sample) -> dict:
    return {"__key__": key, "__url__": "mem", "png": image_bytes(image), "json": sample.to_json().encode()}


def test_over_length_answer_is_cut_and_keeps_exactly_the_masks_of_its_kept_segs(tok):
    from datapipes.loader import Decoder
    from datapipes.text import image_token_id, tokenize_conversation

    image, sample, masks = long_answer_sample()
    two = [sample.conversation[0], {"role": "assistant", "content": "Sure, <p> stripe 0 </p> [SEG], <p> stripe 1 </p> [SEG]"}]
    limit = len(tokenize_conversation(two, tok, image_id=image_token_id(tok), num_image_tokens=16, max_length=10**6).input_ids)
    decode = Decoder(tok, num_image_tokens=16, max_length=limit)
    ex = decode(raw_sample("long", image, sample))
    seg = tok.convert_tokens_to_ids("[SEG]")
    assert ex.tokens.input_ids.count(seg) == 2 and len(ex.masks) == 2 and decode.cut == 1
    assert np.array_equal(ex.masks, np.stack(masks[:2]))


def test_uncuttable_sample_is_dropped_as_too_long_counted_apart_from_corrupt_ones(tmp_path, tok, data):
    image, sample, _ = long_answer_sample(question="Segment the stripes. " * 40)  # the prompt alone is too long
    folder = tmp_path / "long"
    write_shards([("long", image, sample)] + list(generate(7, seed=4, prefix="ok")), folder, maxcount=100)
    cfg = config(str(folder), data[1], batch_size=8, open_shards=1, max_bad_fraction=0.9)
    (batch,) = train_batches(cfg, tok, 1)
    assert "long" not in batch.keys and len(batch) == 7
    assert batch.skipped == {"syn/too_long": 1}


@pytest.mark.parametrize("num_workers", [0])
def test_pixels_normalised_on_device_equal_the_loader_normalised_ones(data, tok, num_workers):
    cpu = train_batches(config(*data), tok, 2, seed=3)
    dev = train_batches(config(*data, normalize_on_device=True), tok, 2, seed=3)
    for a, b in zip(cpu, dev):
        assert b.clip_pixels.dtype == b.sam_pixels.dtype == torch.uint8  # what the workers hand over
        ia, ib = a.model_inputs(), b.model_inputs()  # runs where the batch is: here the CPU, in training the GPU
        torch.testing.assert_close(ib["clip_pixels"], ia["clip_pixels"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ib["sam_pixels"], ia["sam_pixels"], atol=1e-5, rtol=1e-5)


def test_large_jpeg_is_decoded_reduced_and_still_fills_the_sam_frame(tok):
    from PIL import Image

    from datapipes.collate import collate
    from datapipes.loader import Decoder
    from datapipes.schema import Sample, mask_ann

    yy, xx = np.mgrid[0:400, 0:600]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    mask = np.zeros((400, 600), np.uint8)
    mask[100:300, 150:450] = 1
    sample = Sample("referring", [{"role": "user", "content": "<image>\nSegment it."},
                                  {"role": "assistant", "content": "<p> it </p> [SEG]."}],
                    [mask_ann(mask, "it")], [400, 600], {"dataset": "t", "id": "0"})
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    raw = {"__key__": "big", "__url__": "mem", "jpg": buf.getvalue(), "json": sample.to_json().encode()}
    reduced = Decoder(tok, num_image_tokens=16, max_length=200, target_side=48, min_side=32)(raw)
    full = Decoder(tok, num_image_tokens=16, max_length=200)(raw)
    assert reduced.image.size == (75, 50) and full.image.size == (600, 400)  # 1/8 in the DCT domain, >= 48
    kw = dict(pad_id=tok.pad_token_id, clip_size=32, sam_size=48)
    a, b = collate([reduced], **kw), collate([full], **kw)
    assert a.image_sizes.tolist() == b.image_sizes.tolist() == [[32, 48]]
    assert torch.equal(a.gt_masks[0], b.gt_masks[0])  # masks follow the stored size
    assert (a.sam_pixels - b.sam_pixels).abs().mean() < 0.2  # the same picture


def test_a_batch_whose_every_draw_is_bad_reads_spares_and_is_never_empty(tmp_path, tok, data):
    good = write_with_bad_samples(tmp_path / "bad", n_good=3, after=(0, 1, 2))  # 3 good, 3 bad: batch_size 1 hits bad draws
    cfg = config(str(tmp_path / "bad"), data[1], batch_size=1, max_bad_fraction=0.9, bad_fraction_min_seen=1000)
    batches = train_batches(cfg, tok, 12, seed=2)
    assert all(len(b) == 1 and b.keys[0] in good for b in batches)
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    assert sum(skipped.values()) >= 6 and set(skipped) <= {"syn/image", "syn/json", "syn/invalid"}
    assert [b.keys for b in batches] == [b.keys for b in train_batches(cfg, tok, 12, seed=2)]  # spares are deterministic
