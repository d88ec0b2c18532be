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
        Benchmark("gcg", ("val", "test"), "grounded_captions", ("METEOR", "CIDEr", "AP50", "mIoU", "MR text-sim:tfidf")),
        Benchmark("mgsc", ("all", "root", "subtree"), "grounded_captions", ("METEOR", "CIDEr", "AP50", "mIoU", "MR text-sim:tfidf")),
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
    elif bench.family == "generalized" and mode == "teacher_forced":
        # a fed reference shows no rejection: no-target samples would score 1 for free
        out = S.score_generalized([(p, t) for p, t in pairs if t.masks])
        out = {k: v for k, v in out.items() if k not in ("N-acc", "T-acc")}
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
    """report[bench][split] = metrics -> the seeds' tables (MGLMM Tables 3-6: RES cIoU by dataset/split
    with ReasonSeg; gRefCOCO cIoU/gIoU by split; MGSC and GCG M/C/AP50/mIoU/MR; captions CIDEr), one
    row of ours, x100 as printed there; a cell not evaluated is '-'. Other numbers are in the JSON."""
    mr = "MR text-sim:tfidf"
    blocks = [
        ("Referring segmentation (cIoU; ReasonSeg cIoU, gIoU)",
         [(b, [(sp, b, sp, "cIoU") for sp in BENCHMARKS[b].splits]) for b in ("refcoco", "refcoco+", "refcocog")]
         + [("reasonseg", [("cIoU", "reasonseg", sp, "cIoU") for sp in ("val",)] + [("gIoU", "reasonseg", "val", "gIoU")])]),
        ("Generalized referring segmentation (gRefCOCO; N-acc, T-acc beside)",
         [(sp, [(m, "grefcoco", sp, m) for m in ("cIoU", "gIoU", "N-acc", "T-acc")]) for sp in BENCHMARKS["grefcoco"].splits]),
        ("MGSC and GCG (MR: TF-IDF text similarity, not comparable to published MR)",
         [(f"{b} {sp}", [(c, b, sp, m) for c, m in (("M", "METEOR"), ("C", "CIDEr"), ("AP50", "AP50"), ("mIoU", "mIoU"), ("MR", mr))])
          for b in ("mgsc", "gcg") for sp in BENCHMARKS[b].splits]),
        ("Image captioning", [(f"coco {sp}", [("CIDEr", "coco_caption", sp, "CIDEr"), ("METEOR", "coco_caption", sp, "METEOR")])
                              for sp in BENCHMARKS["coco_caption"].splits]),
    ]
    lines = []
    for title, groups in blocks:
        groups = [(g, cols) for g, cols in groups if any(b in report and sp in report[b] for _, b, sp, _ in cols)]
        if not groups:
            continue
        head, sub, row = [], [], []
        for g, cols in groups:
            head.append(g.ljust(8 * len(cols) - 1))
            for label, b, sp, m in cols:
                value = report.get(b, {}).get(sp, {}).get(m)
                sub.append(f"{label:>7}")
                row.append(f"{100 * value:7.1f}" if isinstance(value, (int, float)) else f"{'-':>7}")
        lines += [title, "       " + " ".join(head), "       " + " ".join(sub), "segcap " + " ".join(row), ""]
    return "\n".join(lines).rstrip()
