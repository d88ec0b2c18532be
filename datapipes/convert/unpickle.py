"""Loading the refer toolkit's `refs(*).p` files without running code: a pickle may build only plain
containers and scalars (dict, list, tuple, str, bytes, int, float, bool, None, set); any other global
or persistent id is refused with an error naming it, before it is imported or called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

# Globals a plain-data pickle may name: sets are pickled as a call of the builtin, and Python 3 writes
# bytes in protocols 0-2 as a call of _codecs.encode(str, "latin1"). All three only build data.
ALLOWED_GLOBALS = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): None,  # _latin1_bytes below: the codec name could otherwise import a module
}


class UnsafePickleError(pickle.UnpicklingError):
    pass


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}) (only latin1 bytes)")
    return text.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        # latin1: the refer files were written by Python 2, whose str pickles are bytes
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name] or _latin1_bytes
        raise UnsafePickleError(
            f"{self.source}: refused to load {module}.{name} (only plain containers and scalars are allowed; "
            "this file is not a refer annotation file or has been tampered with)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused a persistent id {pid!r} (plain data only)")


def load_plain_pickle(path: str | Path):
    """The plain data in a pickle file; UnsafePickleError if it names anything else."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise pickle.UnpicklingError(f"{path}: not a readable pickle: {e}") from e
