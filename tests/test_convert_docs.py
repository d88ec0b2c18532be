"""docs/DATA.md stays true: every conversion command in it parses with the real CLI arguments and names a
known dataset and split, and every shard folder configs/data/stage{1,2} read is written by one of them."""

import argparse
import re
import shlex
from pathlib import Path

import yaml

from datapipes.convert import REGISTRY, add_arguments, converter_class

REPO = Path(__file__).resolve().parents[1]


def commands() -> list[list[str]]:
    text = (REPO / "docs" / "DATA.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith(("$C ", "python -m launcher data group")):
            out.append(shlex.split(line))
    return out


def test_every_documented_conversion_parses_and_names_a_known_dataset_and_split():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    converts = [c[1:] for c in commands() if c[0] == "$C"]
    assert len(converts) >= 17
    for argv in converts:
        args = parser.parse_args(argv)
        assert args.dataset in REGISTRY
        splits = converter_class(args.dataset).splits
        assert (args.split or splits[0]) in splits, argv


def test_every_configured_shard_folder_is_built_by_a_documented_command():
    built = set()
    for c in commands():
        i = c.index("--out")
        built.add(c[i + 1].removeprefix("$S/"))
    for name in ("stage1_captions.yaml", "stage2_mixture.yaml"):
        cfg = yaml.safe_load((REPO / "configs" / "data" / name).read_text())
        for source in cfg["train"] + cfg["val"]:
            folder = re.sub(r"^.*/shards/", "", source["path"])
            assert folder in built, f"{name}: {folder} is built by no command in docs/DATA.md"
