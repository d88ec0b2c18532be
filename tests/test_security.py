"""Untrusted input stays data: model folders cannot run their own code (trust_remote_code is never on),
and names read from shards cannot become paths outside the run dir."""

import json
import re
from pathlib import Path

import pytest

from launcher.eval.overlays import safe_name
from launcher.tokenizer import make_tokenizer
from modeling.config import LLMConfig

REPO = Path(__file__).resolve().parent.parent


def test_no_code_of_ours_turns_trust_remote_code_on():
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for d in ("launcher", "modeling", "datapipes", "kernels")
        for p in sorted((REPO / d).rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*(True|1|cfg|config)", line)
    ]
    assert hits == []


def test_a_tokenizer_folder_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "tok"
    folder.mkdir()
    # What a hostile hub folder ships: auto_map pointing at a module of its own that acts on import.
    (folder / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}})
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        make_tokenizer(LLMConfig(tokenizer=str(folder)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "task, want",
    [
        ("referring", "referring"),
        ("../../../etc/passwd", "_.._.._etc_passwd"),
        ("/abs/path", "_abs_path"),
        ("..", "_"),
        (".hidden", "hidden"),
        ("a b;c$(x)", "a_b_c__x_"),
        ("", "_"),
    ],
)
def test_overlay_names_from_shard_data_stay_in_their_folder(tmp_path, task, want):
    name = safe_name(task)
    assert name == want
    assert (tmp_path / f"00_{name}.png").resolve().parent == tmp_path.resolve()
    assert len(safe_name("x" * 500)) == 64
