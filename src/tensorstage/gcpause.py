"""Pausing Python's cycle collector around allocation-heavy passes (lowering, the engine, the summary,
the serving loop), without paying for it afterwards.

Why: those passes allocate millions of small acyclic objects (program nodes, per-node lists, tuples)
that reference counting frees; the collector's passes over them while they grow cost 10-30 % of a
run, so it is paused. But the objects stay tracked, and the first allocation after ``gc.enable()``
runs a young-generation pass over all of them (0.4 s for two million nodes). On leaving, every
tracked object (those made inside the block and any other young ones of the process) is moved to the
oldest generation instead (``gc.freeze()`` then ``gc.unfreeze()``: two list splices, no scan), where
only the collector's rare full passes look at them; nothing is freed or kept alive by it. That is only
done when nothing else has frozen objects (``gc.get_freeze_count() == 0``), so a caller's own
frozen set is never released.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cycle collector inside the block; restore it after (also on error)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()
