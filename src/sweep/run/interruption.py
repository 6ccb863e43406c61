"""Ctrl-C and SIGTERM (how Slurm preempts): unwind like an exception, so runs end KILLED instead of RUNNING."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(SystemExit):
    """Raised in the main thread when the process receives SIGTERM; exits with 143 like a default SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (Ctrl-C already raises KeyboardInterrupt). Outside the
    main thread, where Python cannot install handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe(stop: BaseException) -> str:
    if isinstance(stop, KeyboardInterrupt):
        return "interrupted (SIGINT, Ctrl-C)"
    if isinstance(stop, Terminated):
        return "terminated (SIGTERM)"
    return f"stopped ({type(stop).__name__}: {stop})"
