"""The serving report: ``report.md``, ``result.json``, ``latency_cdf.png``, ``load.png``, written atomically.

* ``latency_cdf.png``: empirical CDFs of TTFT and TPOT (ms), with the SLOs when given.
* ``load.png``: running requests, queue length and KV-cache use over time (per-step values of
  every replica, summed over replicas on a common time grid).
* ``result.json``: the summary of ``tensorstage serve --json`` plus per-request arrays.

Matplotlib Agg only; PNG metadata without software/version strings; content depends only on the
inputs, so two runs give byte-identical directories.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tensorstage.fileio import atomic_dir
from tensorstage.serve.metrics import per_request
from tensorstage.serve.serving import ServingResult

PNG_METADATA: dict[str, Any] = {"Software": None}
GRID_POINTS = 400


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, metadata=PNG_METADATA)


def latency_cdf_png(result: ServingResult, path: Path, slo_ttft_s: float | None, slo_tpot_s: float | None) -> Path:
    """TTFT and TPOT CDFs side by side."""
    pr = per_request(result.requests)
    fig = Figure(figsize=(10, 4))
    for ax, key, slo, name in ((fig.add_subplot(1, 2, 1), "ttft_s", slo_ttft_s, "TTFT"),
                               (fig.add_subplot(1, 2, 2), "tpot_s", slo_tpot_s, "TPOT")):
        x = np.sort(pr[key][np.isfinite(pr[key])]) * 1e3
        if len(x):
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color="#4C78A8")
        if slo is not None:
            ax.axvline(slo * 1e3, color="#E45756", linestyle="--", label="SLO")
            ax.legend(loc="lower right")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def load_png(result: ServingResult, path: Path) -> Path:
    """Running, waiting and KV blocks in use over time, summed over replicas."""
    st = result.steps
    fig = Figure(figsize=(10, 6))
    axes = [fig.add_subplot(3, 1, i + 1) for i in range(3)]
    if len(st["start_s"]):
        t0, t1 = float(st["start_s"].min()), float(st["end_s"].max())
        grid = np.linspace(t0, t1, GRID_POINTS)
        for ax, key, label in zip(axes, ("running", "waiting", "kv_blocks_used"),
                                  ("running requests", "queued requests", "KV blocks in use"), strict=True):
            total = np.zeros(GRID_POINTS)
            for r in np.unique(st["replica"]):
                m = st["replica"] == r
                order = np.argsort(st["start_s"][m], kind="stable")
                s, e, v = st["start_s"][m][order], st["end_s"][m][order], st[key][m][order]
                i = np.searchsorted(s, grid, side="right") - 1
                ok = (i >= 0) & (grid < e[np.maximum(i, 0)])
                total += np.where(ok, v[np.maximum(i, 0)], 0)
            ax.plot(grid, total, color="#4C78A8", linewidth=1)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    _save(fig, path)
    return path


def markdown(summary: Mapping[str, Any], title: str) -> str:
    """The report text (tables of the summary; plots referenced by file name)."""
    lines = [f"# {title}", "", "| metric | value |", "|:---|---:|"]
    for k, v in summary.items():
        if not isinstance(v, dict):
            lines.append(f"| {k} | {v} |")
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 |", "|:---|---:|---:|---:|---:|"]
    for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
        d = summary[k]
        lines.append(f"| {k} | " + " | ".join(str(d[q]) for q in ("mean", "p50", "p90", "p99")) + " |")
    lines += ["", "![latency CDFs](latency_cdf.png)", "", "![load over time](load.png)", ""]
    return "\n".join(lines)


def write_serving_report(out_dir: str | Path, result: ServingResult, summary: Mapping[str, Any], title: str,
                         slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> Path:
    """Write the report directory atomically; returns its path."""
    req = result.requests
    with atomic_dir(out_dir, "--report") as d:
        pr = per_request(req)
        data = {**summary, "per_request": {
            "arrival_s": req.arrival_s.tolist(), "prompt_tokens": req.prompt_tokens.tolist(),
            "output_tokens": req.output_tokens.tolist(), "replica": req.replica.tolist(),
            **{k: [None if not np.isfinite(x) else x for x in v.tolist()] for k, v in pr.items()}}}
        (d / "result.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        (d / "report.md").write_text(markdown(summary, title), encoding="utf-8")
        latency_cdf_png(result, d / "latency_cdf.png", slo_ttft_s, slo_tpot_s)
        load_png(result, d / "load.png")
    return Path(out_dir)


__all__ = ["latency_cdf_png", "load_png", "markdown", "write_serving_report"]
