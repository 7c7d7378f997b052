"""Chrome / Perfetto trace JSON of an :class:`~tensorstage.sim.engine.Execution`.

One process per rank class (named by its class key and rank count); thread 0 is the compute
stream, thread 1 the communication of that class (collectives and send/recv; overlapping
operations are shown stacked by the viewer), plus a ``memory_GiB`` counter track. Times are microseconds, as the Trace Event Format
requires. The file is written atomically (temp file, then rename) and is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorstage.fileio import write_text_atomic
from tensorstage.sim.engine import K_COMP, Execution
from tensorstage.sim.result import memory_series

#: First key of every timeline we write (Chrome's ``otherData``), so a later ``--timeline`` run
#: can tell its own earlier file (which it may replace) from a user's file (which it must not).
TIMELINE_TAG = {"tool": "tensorstage"}
TIMELINE_PREFIX = b'{"otherData":{"tool":"tensorstage"'


def chrome_trace(ex: Execution, max_events: int | None = None) -> dict[str, Any]:
    """The trace as a dict (``{"otherData": TIMELINE_TAG, "traceEvents": [...], "displayTimeUnit": "ms"}``).

    ``max_events`` caps the number of node events (earliest-starting kept), for huge programs.
    """
    events: list[dict[str, Any]] = []
    for c, prog in enumerate(ex.programs):
        label = ",".join(f"{k}={v}" for k, v in sorted(prog.class_key.items())) or "all"
        events.append({"ph": "M", "name": "process_name", "pid": c, "args": {"name": f"{label} (x{ex.ranks[c]})"}})
        events.append({"ph": "M", "name": "thread_name", "pid": c, "tid": 0, "args": {"name": "compute"}})
        events.append({"ph": "M", "name": "thread_name", "pid": c, "tid": 1, "args": {"name": "comm"}})
    nodes: list[tuple[float, int, int, dict[str, Any]]] = []
    for c, prog in enumerate(ex.programs):
        off = ex.offsets[c]
        for node in prog.nodes:
            g = off + node.id
            comp = ex.kind[g] == K_COMP
            args: dict[str, Any] = {"id": node.id, "category": node.category}
            if comp:
                args.update(op=node.op, flops=node.flops, tensor_bytes=node.tensor_bytes)
            else:
                args.update(bytes=node.comm_bytes, axes=list(node.axes) or node.peer_axis)
                if g in ex.algorithm:
                    args["algorithm"] = ex.algorithm[g]
            nodes.append((ex.start[g], c, g, {
                "ph": "X", "name": node.name, "cat": node.category, "pid": c, "tid": 0 if comp else 1,
                "ts": ex.start[g] * 1e6, "dur": (ex.end[g] - ex.start[g]) * 1e6, "args": args,
            }))
    nodes.sort(key=lambda x: (x[0], x[1], x[2]))
    if max_events is not None:
        nodes = nodes[:max_events]
    events.extend(n[3] for n in nodes)
    for c in range(len(ex.programs)):
        for t, b in memory_series(ex, c):
            events.append({"ph": "C", "name": "memory_GiB", "pid": c, "ts": t * 1e6, "args": {"GiB": b / 2**30}})
    return {"otherData": dict(TIMELINE_TAG), "traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(ex: Execution, path: str | Path, max_events: int | None = None) -> Path:
    """Write :func:`chrome_trace` to ``path`` atomically; returns the path."""
    path = Path(path)
    text = json.dumps(chrome_trace(ex, max_events), separators=(",", ":"))
    write_text_atomic(path, text)
    return path
