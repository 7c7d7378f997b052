"""Ctrl-C during a long write: say so at once, clean up fast, never a traceback.

Why: a large ``generate`` writes thousands of files; without this, the first Ctrl-C froze the bar
for many seconds with no word while worker processes printed tracebacks, and a second Ctrl-C
left a multi-GB hidden temp folder behind. With :func:`cancel_on_interrupt` the first Ctrl-C
prints one line and unwinds (the atomic writers remove their temp output on the way out); a second
one exits at once with status 130 (whatever is left is a temp folder of a dead process, which the
next run on the same output removes: :func:`tensorstage.fileio.remove_stale_temps`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

CANCEL_MESSAGE = "cancelling, removing partial output..."

#: ``deferring``: depth of :func:`defer_interrupts` blocks; ``pending``: a first Ctrl-C arrived there;
#: ``exit_after``: set by the CLI (:func:`exit_on_next_interrupt_after_cancel`): once a block was
#: cancelled, the next Ctrl-C exits at once even after the block (while the process unwinds to exit)
_STATE = {"deferring": 0, "pending": False, "exit_after": False}


def exit_on_next_interrupt_after_cancel() -> None:
    """For the command-line process: after a cancelled block, a further Ctrl-C exits at once (status
    130) instead of restoring Python's handler, whose ``KeyboardInterrupt`` could land while the
    process prints its last line and exits (a race a second, quick Ctrl-C hit). A library caller keeps
    its own handler restored."""
    _STATE["exit_after"] = True


def _exit_now(signum: int, frame: FrameType | None) -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(130)


@contextmanager
def cancel_on_interrupt(message: str = CANCEL_MESSAGE) -> Iterator[None]:
    """Within the block, the first SIGINT prints ``message`` on stderr and raises
    :class:`KeyboardInterrupt`; a second exits the process at once (status 130, no traceback).
    Outside the main thread it does nothing (signals are delivered there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        seen[0] += 1
        if seen[0] > 1:  # leave now; worker processes first, or they would outlive us
            _exit_now(signum, frame)
        print(message, file=sys.stderr, flush=True)
        if _STATE["deferring"]:  # inside lock-heavy code: the block raises at its next check
            _STATE["pending"] = True
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _exit_now if (seen[0] and _STATE["exit_after"]) else previous)
        _STATE["pending"] = False


@contextmanager
def defer_interrupts() -> Iterator[None]:
    """Within the block a first Ctrl-C (under :func:`cancel_on_interrupt`) only sets a flag, which
    the block polls with :func:`check_interrupted`. Why: an exception raised asynchronously inside
    ``concurrent.futures`` while it holds its locks can deadlock the pool's shutdown."""
    _STATE["deferring"] += 1
    try:
        yield
    finally:
        _STATE["deferring"] -= 1


def check_interrupted() -> None:
    """Raise :class:`KeyboardInterrupt` if a Ctrl-C arrived inside :func:`defer_interrupts`."""
    if _STATE["pending"]:
        _STATE["pending"] = False
        raise KeyboardInterrupt


def ignore_interrupts() -> None:
    """For worker processes: the parent handles Ctrl-C (and stops them); a worker printing its own
    ``KeyboardInterrupt`` traceback would only bury the one message that matters."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
