"""One simulated step as JSON-ready data (``simulate --json``, ``result.json``) and as console tables.

The dict keeps :class:`~tensorstage.sim.result.SimResult`'s step-level numbers at the top level
(``step_time_s``, ``tokens_per_s``, ``mfu``, ``hfu``, ``peak_memory_bytes``, ``oom``, ...) and puts
the per-class decomposition under ``breakdown`` with the names the report uses:
``compute_s`` (by category and by op), ``exposed_comm_s`` (by ``type/axes``), ``bubble_s``,
``optimizer_s`` and ``memory`` (by category at the peak). For every class
``compute_s.total + exposed_comm_s.total + bubble_s == step_time_s`` (see :mod:`tensorstage.sim.result`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensorstage.report.console import console, print_table
from tensorstage.sim.result import ClassResult, SimResult

#: Memory categories in the order reports stack them.
MEMORY_ORDER = ("weights", "master_weights", "gradients", "optimizer_states", "activations", "comm_buffers",
                "kv_cache")


def class_label(key: Mapping[str, int]) -> str:
    """``pp=3`` / ``pp=3,tp=1`` / ``all`` for a class key."""
    return ",".join(f"{k}={v}" for k, v in sorted(key.items())) or "all"


def memory_categories(at_peak: Mapping[str, int]) -> dict[str, int]:
    """Memory at the peak in report order (known categories first, then any others sorted)."""
    out = {k: int(at_peak[k]) for k in MEMORY_ORDER if k in at_peak}
    out.update({k: int(v) for k, v in sorted(at_peak.items()) if k not in out})
    return out


def class_breakdown(cr: ClassResult) -> dict[str, Any]:
    """The report's view of one class."""
    return {
        "class": class_label(cr.class_key),
        "class_key": dict(cr.class_key),
        "ranks": cr.ranks,
        "nodes": cr.nodes,
        "finish_s": cr.finish_s,
        "compute_s": {"total": cr.compute_busy_s, "by_category": dict(cr.compute_by_category_s),
                      "by_op": dict(cr.compute_by_op_s)},
        "exposed_comm_s": {"total": cr.exposed_comm_total_s, "by_type_axis": dict(cr.exposed_comm_s)},
        "comm_busy_s": dict(cr.comm_busy_s),
        "bubble_s": cr.bubble_s,
        "sync_wait_s": cr.sync_wait_s,
        "optimizer_s": cr.optimizer_s,
        "memory": {"peak_bytes": cr.memory_peak_bytes, "peak_time_s": cr.memory_peak_time_s,
                   "by_category_bytes": memory_categories(cr.memory_at_peak_bytes), "oom": cr.oom},
        "executed_flops": cr.executed_flops,
        "model_flops": cr.model_flops,
    }


def result_dict(result: SimResult, inputs: Mapping[str, Any] | None = None,
                notes: list[str] | None = None) -> dict[str, Any]:
    """JSON-ready summary of a step: inputs, step-level metrics and the per-class ``breakdown``."""
    return {
        "inputs": dict(inputs or {}),
        "step_time_s": result.step_time_s,
        "tokens_per_step": result.tokens_per_step,
        "tokens_per_s": result.tokens_per_s,
        "mfu": result.mfu,
        "hfu": result.hfu,
        "world": result.world,
        "dtype": result.dtype,
        "system": result.system,
        "peak_flops_per_s_per_device": result.peak_flops_per_device,  # a rate: FLOP/s
        "hbm_capacity_bytes": result.hbm_capacity_bytes,
        "peak_memory_bytes": result.peak_memory_bytes,
        "oom": result.oom,
        "collective_algorithms": dict(result.collective_algorithms),
        "breakdown": {"classes": [class_breakdown(c) for c in result.classes]},
        "notes": list(notes or []),
    }


def _gib(n: float) -> float:
    return n / 2**30


def print_summary(data: Mapping[str, Any], max_classes: int = 24) -> None:
    """Rich tables: the step summary, then one row per class (the first ``max_classes``)."""
    inp = data.get("inputs", {})
    title = " / ".join(str(inp[k]) for k in ("model", "system") if inp.get(k)) or "simulated step"
    rows = [
        ["step time (s)", data["step_time_s"]],
        ["tokens/s", data["tokens_per_s"]],
        ["MFU", f"{data['mfu']:.1%}"],
        ["HFU", f"{data['hfu']:.1%}"],
        ["peak memory (GiB)", round(_gib(data["peak_memory_bytes"]), 2)],
        ["HBM capacity (GiB)", round(_gib(data["hbm_capacity_bytes"]), 2)],
        ["out of memory", bool(data["oom"])],
        ["GPUs", data["world"]],
    ]
    print_table(title, ["metric", "value"], rows)
    classes = data["breakdown"]["classes"]
    crow = []
    for c in classes[:max_classes]:
        crow.append([c["class"], c["ranks"], c["compute_s"]["total"], c["exposed_comm_s"]["total"],
                     c["bubble_s"], c["optimizer_s"], round(_gib(c["memory"]["peak_bytes"]), 2)])
    print_table("per rank class (seconds; memory GiB)",
                ["class", "ranks", "compute", "exposed comm", "bubble", "optimizer", "peak mem"], crow)
    if len(classes) > max_classes:
        console.print(f"({len(classes) - max_classes} more classes in --json / the report)")
    for note in data.get("notes", []):
        console.print(f"note: {note}")
