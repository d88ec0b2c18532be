"""A corrupt data set through a real 2-rank ZeRO-3 run (torchrun, gloo): a cut-short tar, a bad JPEG,
bad JSON, an RLE whose runs do not cover its size and a mask count that differs from the [SEG] count.
The run neither crashes nor hangs, and the log and the metrics carry the exact skips per source and reason.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from datapipes.config import SyntheticConfig
from datapipes.order import TarIndex
from datapipes.schema import encode_mask
from datapipes.synthetic import generate, write_synthetic
from launcher.dist import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_corrupt_set(folder: Path) -> None:
    """Two shards of 24 samples, one per rank (batch 4 x 6 steps reads each exactly once):
    shard 0: 21 good, bad JSON, an RLE that covers 32x32 pixels under a 64x64 size, one mask too many;
    shard 1: 22 good, a JPEG cut to 60 bytes, and a last sample cut off by the end of the file."""
    import numpy as np

    folder.mkdir(parents=True)
    good = list(generate(43, seed=21, prefix="good"))
    _, image, s = next(g for g in good if g[2].masks)
    rle_bad, extra_mask = s.to_dict(), s.to_dict()
    rle_bad["masks"][0]["rle"] = {"size": s.image_size, "counts": encode_mask(np.ones((32, 32), np.uint8))["counts"]}
    extra_mask["masks"] = extra_mask["masks"] + extra_mask["masks"][:1]

    def good_raw(key, img, sample):
        return {"__key__": key, "jpg": jpeg(img), "json": sample.to_json().encode()}

    bad0 = [{"__key__": "badjson", "jpg": jpeg(image), "json": b'{"task": "referring", "conversation": ['},
            {"__key__": "badrle", "jpg": jpeg(image), "json": json.dumps(rle_bad).encode()},
            {"__key__": "badcount", "jpg": jpeg(image), "json": json.dumps(extra_mask).encode()}]
    bad1 = [{"__key__": "badjpeg", "jpg": jpeg(image)[:60], "json": s.to_json().encode()},
            good_raw("cutoff", image, s)]
    shard0 = [good_raw(*g) for g in good[:3]] + bad0 + [good_raw(*g) for g in good[3:21]]
    shard1 = [good_raw(*g) for g in good[21:24]] + bad1[:1] + [good_raw(*g) for g in good[24:]] + bad1[1:]
    for name, members in [("shard-000000.tar", shard0), ("shard-000001.tar", shard1)]:
        with wds.TarWriter(str(folder / name)) as w:
            for m in members:
                w.write(m)
    path = folder / "shard-000001.tar"
    offset, _ = TarIndex(str(path)).samples[-1][1]["jpg"]
    path.write_bytes(path.read_bytes()[: offset + 100])  # cut inside the last sample's image
    shards = [{"url": "shard-000000.tar", "count": 24}, {"url": "shard-000001.tar", "count": 24}]
    (folder / "manifest.json").write_text(json.dumps({"format": "uscdf-1", "shards": shards, "total": 48}))


def test_corrupt_set_in_a_2_rank_zero3_run_is_skipped_and_counted_exactly(tmp_path):
    write_corrupt_set(tmp_path / "bad")
    _, val = write_synthetic(SyntheticConfig(out_dir=str(tmp_path / "syn"), num_train=8, num_val=4, samples_per_shard=8))
    run_dir = tmp_path / "run"
    args = [
        f"data.train=[{{name: bad, path: {tmp_path / 'bad'}}}]", f"data.val=[{{name: v, path: {val}}}]",
        "data.batch_size=4", "data.eval_batch_size=4", "data.open_shards=1", "data.max_bad_fraction=0.5",
        f"train.output_dir={run_dir}", "train.steps=6", "train.save_every=100", "train.zero_stage=3",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "launcher", "train", "--config", "configs/train/tiny.yaml", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    expected = {"bad/json": 1, "bad/mask": 1, "bad/invalid": 1, "bad/image": 1, "bad/tar": 1}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    logged = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("data/skipped/"):
                logged[k[len("data/skipped/"):]] = logged.get(k[len("data/skipped/"):], 0) + v
    assert logged == expected
    assert sum(r["data/skipped"] for r in rows) == 5
    assert sum(r["perf/samples_per_s"] > 0 for r in rows) == 6
    assert "data skipped so far (source/reason): bad/image=1, bad/invalid=1, bad/json=1, bad/mask=1, bad/tar=1" in res.stdout
