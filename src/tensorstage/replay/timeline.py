"""Perfetto / Chrome trace of a step replay: one track per rank (measured), then the simulation.

Measured: process ``replay rank r`` with one thread, one complete event per recorded operation
(send/recv/collective/wait) at its start on the shared monotonic clock, relative to the earliest
start of any rank, in microseconds. Simulated: the simulator's own timeline of the same scaled
slice (:func:`tensorstage.sim.timeline.chrome_trace`, one process per rank class), its process ids
shifted past the ranks and its names prefixed ``simulated``, so both open side by side in one file.
"""

from __future__ import annotations

from typing import Any

from tensorstage.replay.step import StepReplay


def replay_trace_events(res: StepReplay) -> dict[str, Any]:
    """The combined trace as a dict (``{"traceEvents": [...], "displayTimeUnit": "ms"}``)."""
    from tensorstage.sim.timeline import chrome_trace

    t0 = min((rec["start_ns"] for out in res.results for rec in out["records"]), default=0)
    events: list[dict[str, Any]] = []
    for r, out in enumerate(res.results):
        rank = res.rank_ops.ranks[r] if res.rank_ops.ranks else r
        events.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"replay rank {rank}"}})
        events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "ops"}})
        for rec in out["records"]:
            c, nid = res.rank_ops.origin[r][rec["i"]]
            node = res.programs[c].nodes[nid]
            op = res.rank_ops.ops[r][rec["i"]]
            events.append({"ph": "X", "name": node.name, "cat": rec["kind"], "pid": r, "tid": 0,
                           "ts": (rec["start_ns"] - t0) / 1e3, "dur": (rec["end_ns"] - rec["start_ns"]) / 1e3,
                           "args": {"kind": rec["kind"], "bytes": op.bytes, "key": rec["key"], "node": nid}})
    shift = len(res.results)
    for e in chrome_trace(res.execution)["traceEvents"]:
        e = dict(e)
        e["pid"] = e["pid"] + shift
        if e.get("name") == "process_name":
            e["args"] = {"name": f"simulated {e['args']['name']}"}
        events.append(e)
    return {"traceEvents": events, "displayTimeUnit": "ms"}
