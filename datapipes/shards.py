"""Writing USCDF samples into WebDataset tar shards (<key>.png + <key>.json) with a manifest.json,
and reading that manifest back (the loaders need its per-shard counts to keep ranks in step).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds
from PIL import Image

from datapipes.schema import Sample

MANIFEST = "manifest.json"
FORMAT = "uscdf-1"


class ManifestError(RuntimeError):
    pass


def write_shards(
    samples: Iterable[tuple[str, Image.Image | np.ndarray, Sample]],
    out_dir: str | os.PathLike,
    *,
    maxcount: int,
    prefix: str = "shard",
) -> dict:
    """Write (key, image, sample) triples as tar shards of at most `maxcount` samples; return the manifest.

    Keys must not contain dots (WebDataset splits the file name at the first dot). The manifest is
    written last, so a folder without one is an interrupted write.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    counts: dict[str, int] = {}
    tasks: Counter = Counter()
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0) as writer:
        for key, image, sample in samples:
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot")
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if list(sample.image_size) != [image.height, image.width]:
                raise ValueError(f"{key}: image_size {sample.image_size} != image {image.height}x{image.width}")
            writer.write({"__key__": key, "png": image.convert("RGB"), "json": sample.to_dict()})
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            tasks[sample.task] += 1
    manifest = {
        "format": FORMAT,
        "shards": [{"url": name, "count": n} for name, n in counts.items()],
        "total": sum(counts.values()),
        "tasks": dict(sorted(tasks.items())),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a shard folder, with `url`s made absolute; ManifestError says what is wrong."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST} in {folder} (not a shard folder, or its writing was interrupted)")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        for s in shards:
            if not isinstance(s["url"], str) or not isinstance(s["count"], int) or s["count"] < 0:
                raise ValueError(f"bad shard entry {s!r}")
        if manifest["total"] != sum(s["count"] for s in shards):
            raise ValueError(f"total {manifest['total']} != sum of shard counts {sum(s['count'] for s in shards)}")
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"corrupt {path}: {e}") from e
    if not shards:
        raise ManifestError(f"{path} lists no shards")
    for s in shards:
        s["url"] = str(Path(folder) / s["url"])
        if not Path(s["url"]).is_file():
            raise ManifestError(f"{path} lists {s['url']}, which does not exist")
    return manifest


def inspect(folder: str | os.PathLike, n: int = 3) -> str:
    """A shard folder's manifest and its first `n` samples' JSON, for `launcher data inspect`."""
    manifest = read_manifest(folder)
    lines = [f"{folder}: {manifest['total']} samples in {len(manifest['shards'])} shards, tasks {manifest.get('tasks')}"]
    urls = [s["url"] for s in manifest["shards"]]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).slice(n):
        d = json.loads(sample["json"])
        lines.append(f"--- {sample['__key__']} ({d['task']}, {len(d['masks'])} masks, image {d['image_size']})")
        lines += [f"  {t['role']}: {t['content']}" for t in d["conversation"]]
    return "\n".join(lines)
