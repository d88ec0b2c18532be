"""Preemption signals (SIGUSR1, SIGTERM) remembered instead of fatal. `python -m launcher train` installs
the handlers before it imports torch (seconds), so a signal during start-up requeues like any other."""

from __future__ import annotations

import signal

_received: int | None = None


def _handle(signum, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handle)


def received() -> int | None:
    """The last preemption signal since install(), or None."""
    return _received
