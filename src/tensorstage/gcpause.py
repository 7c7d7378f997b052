"""Pausing Python's cycle collector around allocation-heavy passes (lowering, the engine, the summary,
the serving loop): one helper for all of them.

Why: those passes allocate millions of small acyclic objects (program nodes, per-node lists, tuples)
that reference counting frees; the collector's passes over them while they grow cost 10-30 % of a
run. The objects stay tracked, so the first allocation after ``gc.enable()`` runs a young-generation
pass over all of them (0.4 s for two million nodes); that pass is kept on purpose. Moving them to
the oldest generation without it (``gc.freeze(); gc.unfreeze()``) was tried and dropped: it skips
the collector's bookkeeping of promoted objects, so full collections stopped and cyclic garbage
(a lowering's stage builder and its data-parallel emitter referenced each other, and held every node
of the stage) piled up until an explorer worker ran out of memory.

That cycle is now broken when the stage is built, so a step's nodes die by reference counting; the
explorer's evaluator (:func:`tensorstage.explore.evaluate.simulate_plan`) pauses the collector for a
whole lower + simulate, so no pass between the passes walks the live nodes either (nested pauses
leave the outermost one in charge).
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
            gc.enable()
