"""The public benchmarks `launcher eval --bench` knows: their splits, how each family is scored, where
their converted shards live by default, and the headline table in the layout of the seeds' tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODES = ("teacher_forced", "generate")


@dataclass(frozen=True)
class Benchmark:
    name: str
    splits: tuple[str, ...]
    family: str  # referring | generalized | grounded_captions | captions
    headline: tuple[str, ...]  # the seeds' columns, in their order

    @property
    def default_mode(self) -> str:
        """The papers' protocol: referring masks teacher-forced (LISA/GLaMM validate); rejection (gRefCOCO,
        as MGLMM) and captions only show in a generated answer."""
        return "teacher_forced" if self.family == "referring" else "generate"


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("refcoco", ("val", "testA", "testB"), "referring", ("cIoU",)),
        Benchmark("refcoco+", ("val", "testA", "testB"), "referring", ("cIoU",)),
        Benchmark("refcocog", ("val", "test"), "referring", ("cIoU",)),
        Benchmark("grefcoco", ("val", "testA", "testB"), "generalized", ("cIoU", "gIoU", "N-acc", "T-acc")),
        Benchmark("reasonseg", ("val", "test"), "referring", ("gIoU", "cIoU", "short/gIoU", "short/cIoU", "long/gIoU", "long/cIoU")),
        Benchmark("gcg", ("val", "test"), "grounded_captions", ("METEOR", "CIDEr", "AP50", "mIoU", "MR(text-sim=tfidf)")),
        Benchmark("mgsc", ("all", "root", "subtree"), "grounded_captions", ("METEOR", "CIDEr", "AP50", "mIoU", "MR(text-sim=tfidf)")),
        Benchmark("coco_caption", ("val", "test"), "captions", ("CIDEr", "METEOR")),
    )
}


def parse(names: str) -> list[Benchmark]:
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; choices: {', '.join(BENCHMARKS)}")
        out.append(BENCHMARKS[name])
    if not out:
        raise ValueError("--bench names no benchmark")
    return out


def splits_of(bench: Benchmark, split: str | None) -> list[str]:
    """--split: one name, a comma list, or absent for the benchmark's first (val) split."""
    chosen = [s.strip() for s in split.split(",")] if split else [bench.splits[0]]
    bad = [s for s in chosen if s not in bench.splits]
    if bad:
        raise ValueError(f"{bench.name} has no split {bad[0]!r}; choices: {', '.join(bench.splits)}")
    return chosen


def shard_dir(bench: Benchmark, split: str, data: str | None = None) -> Path:
    """--data, else $SEGCAP_DATA_ROOT/shards/<bench>_<split> (the converters' output)."""
    if data:
        return Path(data)
    root = os.environ.get("SEGCAP_DATA_ROOT")
    if not root:
        raise ValueError(f"no --data for {bench.name} {split} and SEGCAP_DATA_ROOT is not set")
    return Path(root) / "shards" / f"{bench.name}_{split}"


def score(bench: Benchmark, pairs: list, mode: str) -> dict[str, float]:
    """(Prediction, Target) pairs -> the benchmark family's metrics."""
    from launcher.eval import score as S

    if bench.family == "referring":
        out = S.score_referring(pairs)
    elif bench.family == "generalized":
        out = S.score_generalized(pairs)
    elif bench.family == "grounded_captions":
        out = S.score_grounded_captions(pairs, mode)
    else:
        out = {**S.score_captions(pairs), "n": len(pairs)} if mode == "generate" else {"n": len(pairs)}
    if any(p.boxes is not None for p, _ in pairs):  # the multigranular decoder's boxes
        out.update(S.score_boxes(pairs))
    return out


def table(report: dict) -> str:
    """report[bench][split] = metrics -> one block per benchmark, a row per split, the headline columns
    (x100 as the papers print them, counts as they are)."""
    lines = []
    for name, splits in report.items():
        bench = BENCHMARKS[name]
        cols = [c for c in bench.headline if any(c in m for m in splits.values())] + ["n"]
        lines.append(f"{name:<14}" + "".join(f"{c:>22}" for c in cols))
        for split, m in splits.items():
            cells = [("-" if c not in m else f"{m[c]:.0f}" if c == "n" else f"{100 * m[c]:.1f}") for c in cols]
            lines.append(f"  {split:<12}" + "".join(f"{v:>22}" for v in cells))
    return "\n".join(lines)
