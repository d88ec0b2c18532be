"""The COMPLETE marker's manifest (size and sha256 of every file, written at save): a checkpoint whose
file is missing, cut short or altered is refused with a message naming the file, and the previous
complete one is resumed from instead."""

import json
import os

import pytest

from launcher.checkpoint import MARKER, file_manifest, latest_complete, manifest_problem


def fake_checkpoint(ckpt_dir, step):
    path = ckpt_dir / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(os.urandom(3000))
    (path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(os.urandom(5000))
    (path / "trainable").mkdir()
    (path / "trainable" / "model.safetensors").write_bytes(os.urandom(700))
    (path / MARKER).write_text(json.dumps({"step": step, "world_size": 2, "files": file_manifest(path)}))
    return path


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one_is_used(tmp_path, capsys, damage):
    older, newer = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    assert sorted(json.loads((newer / MARKER).read_text())["files"]) == [
        "trainable/model.safetensors", "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert latest_complete(tmp_path) == newer and manifest_problem(newer) is None
    victim = newer / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "delete":
        victim.unlink()
        want = f"{victim} is missing"
    elif damage == "truncate":
        os.truncate(victim, 4096)
        want = f"{victim} has 4096 bytes, the manifest says 5000"
    else:
        data = bytearray(victim.read_bytes())
        data[1234] ^= 1
        victim.write_bytes(bytes(data))
        want = f"{victim} does not match its sha256"
    assert manifest_problem(newer) == want if damage != "flip" else manifest_problem(newer).startswith(want)
    assert latest_complete(tmp_path) == older
    assert f"checkpoint {newer} refused: {want}" in capsys.readouterr().out


def test_marker_without_manifest_is_trusted_and_no_good_checkpoint_gives_none(tmp_path):
    legacy = tmp_path / "step_00000001"
    legacy.mkdir()
    (legacy / MARKER).write_text(json.dumps({"step": 1, "world_size": 2}))
    assert latest_complete(tmp_path) == legacy
    only = fake_checkpoint(tmp_path / "b", 3)
    (only / "trainable" / "model.safetensors").unlink()
    assert latest_complete(tmp_path / "b") is None
