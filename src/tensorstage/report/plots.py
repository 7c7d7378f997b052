"""PNG plots of one simulated step: pipeline timeline, time breakdown, memory breakdown.

Matplotlib with the Agg canvas only (no pyplot, no display, no global state). Files are
byte-identical across runs: PNG metadata carries no software/version string and no timestamp
(``metadata={"Software": None}``), and every input is iterated in a sorted order.

The timeline draws one row per rank class (pipeline stages for a PP plan): the compute stream as
a full-height bar coloured by node category, communication in flight as a thin bar under it
(collectives and point-to-point in two colours). Back-to-back intervals of one colour are merged
first (gaps below 1e-5 of the step), so even millions of nodes draw as a few thousand rectangles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tensorstage.report.summary import MEMORY_ORDER, class_label
from tensorstage.sim.engine import K_COLL, K_COMP, Execution

CATEGORY_COLORS = {
    "fwd": "#4C78A8", "bwd_input": "#F58518", "bwd_weight": "#B7791F", "bwd": "#D98C2B",
    "recompute": "#9D6CC8", "optimizer": "#54A24B", "other": "#9E9E9E",
}
COMM_COLORS = {"collective": "#2A9D8F", "p2p": "#E45756"}
MEMORY_COLORS = {"weights": "#4C78A8", "master_weights": "#9ECAE9", "gradients": "#F58518",
                 "optimizer_states": "#54A24B", "activations": "#E45756", "comm_buffers": "#72B7B2",
                 "kv_cache": "#B279A2"}
EXPOSED_COLOR, BUBBLE_COLOR = "#E45756", "#DDDDDD"
MAX_ROWS = 64
DPI = 100
PNG_METADATA: dict[str, Any] = {"Software": None}


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)


def _merge(starts: np.ndarray, ends: np.ndarray, gap: float) -> list[tuple[float, float]]:
    """Union of intervals (sorted), joining those separated by less than ``gap``: (start, width)."""
    if len(starts) == 0:
        return []
    o = np.argsort(starts, kind="stable")
    s, e = starts[o], ends[o]
    run_end = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > run_end[:-1] + gap
    first = s[new]
    last = run_end[np.r_[np.flatnonzero(new)[1:] - 1, len(s) - 1]]
    return [(float(a), float(b - a)) for a, b in zip(first, last, strict=True)]


def _scale(step_s: float) -> tuple[float, str]:
    if step_s >= 1.0:
        return 1.0, "s"
    return 1e3, "ms"


def timeline_png(ex: Execution, path: str | Path, title: str = "") -> Path:
    """The pipeline-schedule timeline of ``ex`` (see module docstring)."""
    path = Path(path)
    order = sorted(range(len(ex.programs)), key=lambda c: sorted(ex.programs[c].class_key.items()))
    rows = order[:MAX_ROWS]
    step = ex.step_time_s or 1.0
    k, unit = _scale(step)
    gap = step * 1e-5
    start, end, kind = ex.start_a, ex.end_a, ex.kind_a
    height = min(0.5 * len(rows) + 1.6, 20.0)
    fig = Figure(figsize=(12, height))
    ax = fig.add_subplot(1, 1, 1)
    used: set[str] = set()
    used_comm: set[str] = set()
    for y, c in enumerate(rows):
        off, stop = ex.offsets[c], ex.offsets[c + 1]
        cats = np.array([n.category for n in ex.programs[c].nodes], dtype=object)
        st, en, kd = start[off:stop], end[off:stop], kind[off:stop]
        comp = kd == K_COMP
        for cat in sorted(set(cats[comp].tolist())):
            m = comp & (cats == cat)
            bars = _merge(st[m] * k, en[m] * k, gap * k)
            color = CATEGORY_COLORS.get(cat, CATEGORY_COLORS["other"])
            used.add(cat if cat in CATEGORY_COLORS else "other")
            ax.broken_barh(bars, (y - 0.4, 0.55), facecolors=color, linewidth=0)
        for name, mask in (("collective", kd == K_COLL), ("p2p", (kd != K_COMP) & (kd != K_COLL))):
            if mask.any():
                used_comm.add(name)
                bars = _merge(st[mask] * k, en[mask] * k, gap * k)
                ax.broken_barh(bars, (y + 0.2, 0.2), facecolors=COMM_COLORS[name], linewidth=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([class_label(ex.programs[c].class_key) for c in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, step * k)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title or "pipeline schedule (compute by category; thin bars: communication in flight)")
    handles = [Patch(color=CATEGORY_COLORS[c], label="bwd (input+weight)" if c == "bwd" else c)
               for c in CATEGORY_COLORS if c in used]
    handles += [Patch(color=COMM_COLORS[c], label=f"comm: {c}") for c in COMM_COLORS if c in used_comm]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=8)
    if len(order) > MAX_ROWS:
        ax.text(1.0, 1.01, f"first {MAX_ROWS} of {len(order)} classes", transform=ax.transAxes, ha="right",
                fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def time_breakdown_png(classes: Sequence[Mapping[str, Any]], step_time_s: float, path: str | Path) -> Path:
    """Stacked horizontal bars per class: compute by category, exposed communication, bubble."""
    path = Path(path)
    rows = list(classes)[:MAX_ROWS]
    k, unit = _scale(step_time_s or 1.0)
    cats = sorted({cat for c in rows for cat in c["compute_s"]["by_category"]},
                  key=lambda x: (list(CATEGORY_COLORS).index(x) if x in CATEGORY_COLORS else 99, x))
    fig = Figure(figsize=(10, min(0.4 * len(rows) + 1.8, 20.0)))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for cat in cats:
        v = np.array([c["compute_s"]["by_category"].get(cat, 0.0) for c in rows]) * k
        ax.barh(y, v, left=left, color=CATEGORY_COLORS.get(cat, CATEGORY_COLORS["other"]), label=f"compute: {cat}")
        left += v
    for label, key, color in (("exposed comm", "exposed_comm_s", EXPOSED_COLOR), ("bubble", "bubble_s", BUBBLE_COLOR)):
        v = np.array([c[key]["total"] if isinstance(c[key], dict) else c[key] for c in rows]) * k
        ax.barh(y, v, left=left, color=color, label=label)
        left += v
    ax.set_yticks(y)
    ax.set_yticklabels([c["class"] for c in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"time per step ({unit})")
    ax.set_title("time breakdown per rank class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def memory_breakdown_png(classes: Sequence[Mapping[str, Any]], capacity_bytes: int, path: str | Path) -> Path:
    """Stacked bars per class of memory at its peak by category, against the HBM capacity."""
    path = Path(path)
    rows = list(classes)[:MAX_ROWS]
    have = {c for r in rows for c, v in r["memory"]["by_category_bytes"].items() if v}
    cats: list[str] = [c for c in MEMORY_ORDER if c in have]
    cats += sorted(have - set(cats))
    fig = Figure(figsize=(max(6.0, min(0.35 * len(rows) + 3, 20.0)), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for cat in cats:
        v = np.array([r["memory"]["by_category_bytes"].get(cat, 0) for r in rows], dtype=np.float64) / 2**30
        ax.bar(x, v, bottom=bottom, color=MEMORY_COLORS.get(cat, "#9E9E9E"), label=cat)
        bottom += v
    cap = capacity_bytes / 2**30
    ax.axhline(cap, color="black", linestyle="--", linewidth=1, label=f"HBM capacity {cap:.0f} GiB")
    ax.set_xticks(x)
    ax.set_xticklabels([r["class"] for r in rows], rotation=90 if len(rows) > 8 else 0, fontsize=8)
    ax.set_ylabel("GiB at the class's peak")
    ax.set_ylim(0, max(cap, float(bottom.max()) if len(bottom) else 0.0) * 1.1)
    ax.set_title("peak memory per rank class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path
