"""One training rank with a fault armed: `python -m tests.chaos_rank train --config ...` runs
`python -m launcher` unchanged, and SEGCAP_CHAOS (JSON) says when to send which signal to itself.

The spec {"sig": 9, "phase": "save", "nth": 2, "delay": 0.3} fires `delay` seconds after this rank
enters its 2nd checkpoint save; phase "startup" counts from process start, "step" from the nth
micro-step's start, "eval" from the nth Evaluator.run. Each rank appends the phases it goes through
(and the one a fault landed in) to SEGCAP_CHAOS_LOG, so the campaign knows where a kill really hit.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import runpy
import sys
import threading
import time

SPEC = json.loads(os.environ.get("SEGCAP_CHAOS") or "null")
LOG = os.environ.get("SEGCAP_CHAOS_LOG")
T0 = time.time()
phase = "startup"
counts = {"step": 0, "save": 0, "eval": 0}


def _log(row: dict) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "t": time.time() - T0, **row}) + "\n")


def _fire() -> None:
    _log({"fired": SPEC["sig"], "phase": phase, "counts": dict(counts), "spec": SPEC})
    os.kill(os.getpid(), SPEC["sig"])


def _arm(kind: str) -> None:
    """Start the fault's timer if this is the phase occurrence it waits for."""
    if SPEC and SPEC["phase"] == kind and counts.get(kind, 0) == SPEC.get("nth", 1):
        timer = threading.Timer(SPEC["delay"], _fire)
        timer.daemon = True  # a fault that would land after the run ended does not keep it alive
        timer.start()


def _enter(kind: str):
    global phase
    counts[kind] += 1
    before, phase = phase, kind
    _log({"enter": kind, "n": counts[kind]})
    _arm(kind)
    return before


def _wrap(fn, kind: str):
    def wrapped(*args, **kwargs):
        global phase
        before = _enter(kind)
        try:
            return fn(*args, **kwargs)
        finally:
            _log({"leave": kind, "n": counts[kind]})
            phase = before

    return wrapped


def _patch_checkpoint(module) -> None:
    module.save = _wrap(module.save, "save")


def _patch_evaluate(module) -> None:
    module.Evaluator.run = _wrap(module.Evaluator.run, "eval")


def _patch_train(module) -> None:
    add = module._Meter.add

    def add_and_mark(self, out, batch):  # a micro-step has just finished: the next one starts
        global phase
        if phase == "startup":
            phase = "step"
        counts["step"] += 1
        _arm("step")
        return add(self, out, batch)

    module._Meter.add = add_and_mark


PATCHES = {"launcher.checkpoint": _patch_checkpoint, "launcher.eval.evaluator": _patch_evaluate, "launcher.train": _patch_train}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a launcher module right after it is first imported (importing it here, before
    launcher/__main__ installs its signal handlers, would move the start-up window)."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "__main__":
    sys.meta_path.insert(0, _PatchOnImport())
    counts["startup"] = 1
    _arm("startup")
    sys.argv = ["launcher", *sys.argv[1:]]
    runpy.run_module("launcher", run_name="__main__", alter_sys=True)
