"""The restricted unpickler reads refer's pickled refs and refuses a pickle that would run code."""

import os
import pickle

import pytest

from datapipes.convert.unpickle import UnsafePickleError, load_plain_pickle


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious refs(unc).p does: call os.system when loaded
        return (os.system, (f"touch {self.marker}",))


def test_plain_refs_load_in_every_protocol(tmp_path):
    refs = [{"ref_id": 1, "ann_id": [3, -1], "sentences": [{"sent": "the cat", "sent_id": 7}], "box": (1.5, 2.0),
             "tags": {"a", "b"}, "raw": b"bytes", "none": None, "flag": True}]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"refs{protocol}.p"
        with open(path, "wb") as f:
            pickle.dump(refs, f, protocol=protocol)
        assert load_plain_pickle(path) == refs


def test_a_pickle_that_calls_os_system_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump([{"ref_id": 1}, Exploit(marker)], f, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refused to load (posix|os)\.system") as e:
        load_plain_pickle(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_a_pickled_class_instance_is_refused(tmp_path):
    path = tmp_path / "obj.p"
    path.write_bytes(pickle.dumps(Exploit("x"), protocol=0).replace(b"posix\nsystem", b"collections\nOrderedDict"))
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        load_plain_pickle(path)


def test_a_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}] * 10)[:-7])
    with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
        load_plain_pickle(path)


def test_launcher_data_convert_stops_on_a_malicious_refs_file(tmp_path, capsys):
    from launcher.__main__ import main

    marker = tmp_path / "pwned"
    src = tmp_path / "refcoco"
    src.mkdir()
    (src / "instances.json").write_text('{"images": [], "annotations": []}')
    with open(src / "refs(unc).p", "wb") as f:
        pickle.dump([{"ref_id": 1}, Exploit(marker)], f, protocol=2)
    rc = main(["data", "convert", "refcoco", "--src", str(src), "--images", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "refused to load" in err and "refs(unc).p" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
