"""Perfetto / Chrome trace JSON of a serving run: a track per replica (engine steps) and per request.

Process 0..R-1: one per replica, its steps as slices (tokens, prefill tokens, decodes, running,
waiting in ``args``) plus counters of running requests, queue length and KV blocks in use. Process
R ("requests"): one thread per request (up to ``max_requests``, the earliest arrivals) with two
slices from the request table: ``queue+prefill`` (arrival to first token: the table does not keep
when a prefill started) and ``decode`` (first token to finish). Times are
microseconds as the Trace Event Format requires; the file is written atomically and deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tensorstage.fileio import write_text_atomic
from tensorstage.serve.entities import RequestTable


def serving_trace(req: RequestTable, steps: dict[str, np.ndarray], max_requests: int = 2000,
                  max_steps: int = 200_000) -> dict[str, Any]:
    """The trace as a dict (``{"traceEvents": [...], "displayTimeUnit": "ms"}``)."""
    ev: list[dict[str, Any]] = []
    reps = sorted(set(steps["replica"].tolist())) if len(steps["replica"]) else []
    for r in reps:
        ev.append({"ph": "M", "name": "process_name", "pid": int(r), "args": {"name": f"replica {r}"}})
        ev.append({"ph": "M", "name": "thread_name", "pid": int(r), "tid": 0, "args": {"name": "steps"}})
    order = np.lexsort((steps["start_s"], steps["replica"]))[:max_steps] if len(steps["replica"]) else []
    for i in order:
        pid = int(steps["replica"][i])
        ts = float(steps["start_s"][i]) * 1e6
        args = {k: int(steps[k][i]) for k in ("tokens", "prefill_tokens", "decodes", "running", "waiting",
                                               "kv_blocks_used")}
        ev.append({"ph": "X", "name": "step", "pid": pid, "tid": 0, "ts": ts,
                   "dur": (float(steps["end_s"][i]) - float(steps["start_s"][i])) * 1e6, "args": args})
        ev.append({"ph": "C", "name": "load", "pid": pid, "ts": ts,
                   "args": {"running": args["running"], "waiting": args["waiting"]}})
        ev.append({"ph": "C", "name": "kv_blocks_used", "pid": pid, "ts": ts, "args": {"blocks": args["kv_blocks_used"]}})
    rp = (max(reps) + 1) if reps else 0
    ev.append({"ph": "M", "name": "process_name", "pid": rp, "args": {"name": "requests"}})
    for r in np.argsort(req.arrival_s, kind="stable")[:max_requests]:
        r = int(r)
        a, f, e = (float(x) for x in (req.arrival_s[r], req.first_token_s[r], req.finish_s[r]))
        ev.append({"ph": "M", "name": "thread_name", "pid": rp, "tid": r, "args": {"name": f"request {r}"}})
        args = {"prompt_tokens": int(req.prompt_tokens[r]), "output_tokens": int(req.output_tokens[r]),
                "replica": int(req.replica[r]), "preemptions": int(req.preemptions[r])}
        ev.append({"ph": "X", "name": "queue+prefill", "pid": rp, "tid": r, "ts": a * 1e6, "dur": (f - a) * 1e6,
                   "args": args})
        if e > f:
            ev.append({"ph": "X", "name": "decode", "pid": rp, "tid": r, "ts": f * 1e6, "dur": (e - f) * 1e6})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def write_serving_trace(req: RequestTable, steps: dict[str, np.ndarray], path: str | Path,
                        max_requests: int = 2000) -> Path:
    """Write :func:`serving_trace` to ``path`` atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, json.dumps(serving_trace(req, steps, max_requests), separators=(",", ":")))
    return path


__all__ = ["serving_trace", "write_serving_trace"]
