"""Running one conversion: a converter's units -> deterministic tar shards written in parallel, resumable,
with bad records skipped and counted by reason, then manifest.json with the run's summary.

Shard i holds units i, i + S, i + 2S, ... of the converter's unit list (S shards), so a shard's bytes depend
only on the inputs and the arguments: a killed run restarted with the same arguments skips the shards it
finished (`<shard>.tar` + `<shard>.stats.json`) and rewrites the others to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from datapipes.convert.common import BadRecord, ConvertError, Output, sample_key
from datapipes.schema import SchemaError, validate
from datapipes.shards import FORMAT, MANIFEST

PLAN = "convert.json"  # the arguments and unit list digest of the conversion that owns the folder
BAD_LIST = "bad_records.jsonl"  # every skipped record: {"reason", "record", "message"}
SIZE_PROBES = 256  # units whose photo sizes estimate the total bytes (for --shard-size)


@dataclass
class ConvertArgs:
    dataset: str
    src: str
    out: str
    images: str | None = None
    split: str | None = None  # None: the converter's first split
    workers: int = 1
    shard_size_mb: float = 512.0
    min_shards: int = 256  # 32 ranks x 8 loader workers each read whole shards
    turns: int | None = None  # question/answer pairs per sample; None: the converter's default
    options: dict = field(default_factory=dict)  # converter-specific (--class-names ...)


class Converter:
    """One dataset family. __init__ reads the annotation files (in the parent: workers inherit it by
    fork); units() lists the work deterministically; convert() turns one unit into samples in a worker."""

    splits: tuple[str, ...] = ("train",)
    default_turns = 1

    def __init__(self, args: ConvertArgs):
        self.args = args
        self.name = args.dataset
        self.split = args.split or self.splits[0]
        if self.split not in self.splits:
            raise ConvertError(f"{self.name}: unknown --split {self.split!r} (known: {', '.join(self.splits)})")
        self.turns = args.turns or self.default_turns
        self.src = Path(args.src)
        self.images = Path(args.images) if args.images else self.src
        if not self.src.exists():
            raise ConvertError(f"{self.name}: --src {self.src} does not exist")

    def units(self) -> list[tuple[str, object]]:
        """[(uid, payload)] in a fixed order; uid is unique and names the record in the summary."""
        raise NotImplementedError

    def image_path(self, payload) -> Path | None:
        """The photo of a unit, for the size estimate."""
        return None

    def convert(self, uid: str, payload, bad) -> list[Output]:
        """The samples of one unit; raise BadRecord to skip it, or call bad(reason, message) for a part dropped."""
        raise NotImplementedError


# --- the run ---------------------------------------------------------------------------------------

_ACTIVE: dict = {}  # the converter, plan and out dir of the running conversion (inherited by forked workers)


def run_conversion(conv: Converter, args: ConvertArgs, log=sys.stderr) -> dict:
    """Write (or finish writing) the shards of `conv` into args.out; return the manifest."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    units = conv.units()
    if not units:
        raise ConvertError(f"{conv.name}/{conv.split}: no records found under {args.src}")
    uids = [u for u, _ in units]
    if len(set(uids)) != len(uids):
        raise ConvertError(f"{conv.name}: record ids are not unique (a converter bug)")
    n_shards = _shard_count(conv, units, args)
    plan = {
        "dataset": conv.name, "split": conv.split, "src": str(Path(args.src).resolve()),
        "images": str(conv.images.resolve()), "turns": conv.turns, "options": args.options,
        "shard_size_mb": args.shard_size_mb, "min_shards": args.min_shards,
        "units": len(units), "units_sha256": hashlib.sha256("\n".join(uids).encode()).hexdigest(),
        "shards": n_shards,
    }
    _claim(out, plan)
    for tmp in out.glob("*.tmp"):  # a killed run's half-written files
        tmp.unlink()
    done = [i for i in range(n_shards) if (out / _stats_name(i)).is_file() and (out / _shard_name(i)).is_file()]
    pending = sorted(set(range(n_shards)) - set(done))
    _ACTIVE.update(conv=conv, units=units, n_shards=n_shards, out=out)  # before the fork: workers inherit it
    # Workers fork before the progress bar starts its monitor thread (a fork copies no thread, only locks).
    parallel = args.workers > 1 and len(pending) > 1
    pool = multiprocessing.get_context("fork").Pool(min(args.workers, len(pending))) if parallel else None
    bar = tqdm(total=n_shards, initial=len(done), desc=f"convert {conv.name}/{conv.split}", unit="shard",
               file=log, mininterval=2.0)
    start = time.time()
    try:
        for _ in pool.imap_unordered(_write_shard, pending) if pool else map(_write_shard, pending):
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()
        _ACTIVE.clear()
    manifest = _manifest(out, n_shards, plan, reused=len(done), seconds=time.time() - start)
    print(summary_text(manifest, out), file=log)
    if manifest["total"] == 0:
        raise ConvertError(f"{conv.name}/{conv.split}: every record was bad; see {out / BAD_LIST}")
    return manifest


def _shard_count(conv: Converter, units: list, args: ConvertArgs) -> int:
    """max(--min-shards, estimated bytes / --shard-size), at most one shard per unit. The estimate reads the
    sizes of SIZE_PROBES evenly spaced photos, so it is the same on every run over the same files."""
    step = max(1, len(units) // SIZE_PROBES)
    sizes = []
    for _, payload in units[::step][:SIZE_PROBES]:
        path = conv.image_path(payload)
        try:
            sizes.append(os.stat(path).st_size if path else 0)
        except OSError:
            sizes.append(0)
    est_bytes = (sum(sizes) / max(len(sizes), 1) + 2048) * len(units)  # + ~2 kB of JSON per sample
    by_size = math.ceil(est_bytes / (args.shard_size_mb * 2**20))
    return max(1, min(len(units), max(args.min_shards, by_size)))


def _claim(out: Path, plan: dict) -> None:
    """Record the plan in an empty folder, or check that the folder's plan is this one (resume)."""
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = {k: (old.get(k), plan[k]) for k in plan if old.get(k) != plan[k]}
            raise ConvertError(
                f"{out} holds a conversion with other arguments or inputs (was, now: {diff}); "
                "resume with the same arguments, or use another --out"
            )
        return
    if any(out.glob("*.tar")) or (out / MANIFEST).exists():
        raise ConvertError(f"{out} already holds shards not written by `data convert`; use an empty --out")
    tmp = out / (PLAN + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1, sort_keys=True))
    tmp.replace(path)


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _stats_name(i: int) -> str:
    return f"shard-{i:06d}.stats.json"


def _write_shard(index: int) -> dict:
    """Convert shard `index`'s units into its tar; the stats file, written last, marks it done."""
    conv: Converter = _ACTIVE["conv"]
    out: Path = _ACTIVE["out"]
    stats = {"count": 0, "tasks": Counter(), "bad": [], "image_bytes": 0, "json_bytes": 0, "reencoded": 0}

    def bad(uid: str, reason: str, message: str) -> None:
        stats["bad"].append({"reason": reason, "record": uid, "message": message})

    tmp = out / (_shard_name(index) + ".tmp")
    with open(tmp, "wb") as f:
        # Fixed mtime and owner: the same samples give the same bytes on every run.
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="segcap", group="segcap")
        for uid, payload in _ACTIVE["units"][index :: _ACTIVE["n_shards"]]:
            try:
                outputs = conv.convert(uid, payload, lambda reason, msg, uid=uid: bad(uid, reason, msg))
            except BadRecord as e:
                bad(uid, e.reason, str(e))
                continue
            except Exception as e:  # noqa: BLE001  a record no rule foresaw must not end a day-long run: count it, keep going
                bad(uid, "error", f"{type(e).__name__}: {e}")
                continue
            for j, o in enumerate(outputs):
                d = o.sample.to_dict()
                try:
                    validate(d)
                except SchemaError as e:
                    bad(uid, "invalid", str(e))
                    continue
                js = json.dumps(d, ensure_ascii=False).encode()
                writer.write({"__key__": sample_key(conv.name, conv.split, uid, j), o.ext: o.image, "json": js})
                stats["count"] += 1
                stats["tasks"][o.sample.task] += 1
                stats["image_bytes"] += len(o.image)
                stats["json_bytes"] += len(js)
                stats["reencoded"] += int(o.reencoded)
        writer.close()
    tmp.replace(out / _shard_name(index))
    stats["tar_bytes"] = (out / _shard_name(index)).stat().st_size
    stats["tasks"] = dict(stats["tasks"])
    tmp = out / (_stats_name(index) + ".tmp")
    tmp.write_text(json.dumps(stats, sort_keys=True))
    tmp.replace(out / _stats_name(index))
    return stats


def _manifest(out: Path, n_shards: int, plan: dict, reused: int, seconds: float) -> dict:
    """manifest.json from the shards' stats (empty shards are left out) plus the conversion summary."""
    shards, tasks, bad, reasons = [], Counter(), [], Counter()
    sums = Counter()
    for i in range(n_shards):
        st = json.loads((out / _stats_name(i)).read_text())
        if st["count"]:
            shards.append({"url": _shard_name(i), "count": st["count"]})
        tasks.update(st["tasks"])
        bad += st["bad"]
        reasons.update(b["reason"] for b in st["bad"])
        for k in ("count", "image_bytes", "json_bytes", "tar_bytes", "reencoded"):
            sums[k] += st[k]
    n = sums["count"]
    summary = {
        "dataset": plan["dataset"], "split": plan["split"], "samples": n, "shards": len(shards),
        "shards_reused": reused, "seconds": round(seconds, 1),
        "bytes_per_sample": round(sums["tar_bytes"] / n) if n else 0,
        "image_bytes_per_sample": round(sums["image_bytes"] / n) if n else 0,
        "json_bytes_per_sample": round(sums["json_bytes"] / n) if n else 0,
        "reencoded_images": sums["reencoded"],
        "bad": dict(sorted(reasons.items())),
        "bad_examples": {r: [b for b in bad if b["reason"] == r][:5] for r in sorted(reasons)},
    }
    with open(out / (BAD_LIST + ".tmp"), "w") as f:
        f.writelines(json.dumps(b) + "\n" for b in bad)
    (out / (BAD_LIST + ".tmp")).replace(out / BAD_LIST)
    manifest = {"format": FORMAT, "shards": shards, "total": n, "tasks": dict(sorted(tasks.items())), "convert": summary}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def summary_text(manifest: dict, out: Path) -> str:
    s = manifest["convert"]
    lines = [
        (f"{s['dataset']}/{s['split']}: {s['samples']} samples in {s['shards']} shards ({s['shards_reused']} reused "
         f"from an earlier run) -> {out}  [{s['seconds']} s]"),
        f"  tasks: {manifest['tasks']}",
        (f"  bytes per sample: {s['bytes_per_sample']} (image {s['image_bytes_per_sample']}, "
         f"json {s['json_bytes_per_sample']}); re-encoded images: {s['reencoded_images']}"),
        f"  bad records: {sum(s['bad'].values())} {s['bad'] or ''}",
    ]
    for reason, examples in s["bad_examples"].items():
        lines += [f"    {reason}: {b['record']}: {b['message']}" for b in examples]
    if s["bad"]:
        lines.append(f"  every bad record: {out / BAD_LIST}")
    return "\n".join(lines)


