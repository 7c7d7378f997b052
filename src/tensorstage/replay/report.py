"""Report of a replay: ``result.json``, ``report.md`` and a measured-vs-predicted plot per size.

Written into a directory atomically (:func:`tensorstage.fileio.atomic_dir`). The plot draws, per
benchmarked operation, measured time (median of repetitions) against message size on log-log axes
with both predictions (simulator model, model of the algorithm that ran) as lines. Matplotlib Agg only; PNG
metadata carries no version or date.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from tensorstage.fileio import atomic_dir

PNG_METADATA: dict[str, Any] = {"Software": None}


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _impl_line(doc: dict[str, Any]) -> str:
    impl = doc.get("config", {}).get("collectives", "native")
    if impl == "p2p":
        return ("`p2p`: the simulator's algorithms (ring reduce-scatter / all-gather / all-reduce, direct "
                "all-to-all) on torch.distributed send/recv over gloo")
    return "`native`: gloo's own collectives (its reduce-scatter is an all-reduce of the whole input)"


def bench_markdown(doc: dict[str, Any]) -> str:
    """Markdown tables of a :func:`tensorstage.replay.bench.bench_dict` document."""
    lk = doc["links"]
    tiers = ", ".join(f"{t['name']}: {t['rate_Bps'] / 1e6:g} MB/s, {t['latency_s'] * 1e6:g} us" for t in lk["tiers"])
    lines = [f"# Communication replay: {lk['ranks']} processes on {doc['network']}", "",
             f"Links ({'node size ' + str(lk['node_size']) + '; ' if len(lk['tiers']) > 1 else ''}{tiers}).", "",
             f"Collectives: {_impl_line(doc)}", ""]
    lines += [f"- {n}" for n in doc.get("notes", [])]
    lines += ["", "| op | group | size | measured ms | simulator ms | error % | algorithm model ms | error % |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["comparison"]:
        lines.append(f"| {r['op']} | {r['group']} | {_fmt_bytes(r['size_bytes'])} | {r['measured_s'] * 1e3:.3f} | "
                     f"{r['simulator_s'] * 1e3:.3f} | {r['simulator_error_pct']:+.1f} | {r['algorithm_s'] * 1e3:.3f} | "
                     f"{r['algorithm_error_pct']:+.1f} |")
    lines += ["", "Largest |error| from 1 MiB up:", "", "| op/group | cases | simulator % | algorithm model % |",
              "| --- | ---: | ---: | ---: |"]
    for k, v in sorted(doc["errors_from_1MiB"].items()):
        lines.append(f"| {k} | {v['cases']} | {v['max_abs_simulator_error_pct']:.1f} | {v['max_abs_algorithm_error_pct']:.1f} |")
    lines += ["", "Alpha-beta fit per tier (alpha = emulated delay + the host's per-message cost):", "",
              "| tier | alpha us | emulated delay us | bandwidth MB/s | tc rate MB/s | vs tc rate % | cases | rel. RMS % |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for f in doc["fit"]:
        lines.append(f"| {f['tier']} {f['name']} | {f['latency_s'] * 1e6:.1f} | "
                     f"{f.get('emulated_latency_s', 0.0) * 1e6:.1f} | {f['bandwidth_Bps'] / 1e6:.3f} | "
                     f"{f['emulated_rate_Bps'] / 1e6:.3f} | {f['bandwidth_vs_emulated_pct']:+.1f} | {f['cases']} | "
                     f"{f['rel_rms_pct']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_bench(doc: dict[str, Any], path: Path) -> None:
    """Measured vs predicted time per size, one panel per operation/group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["comparison"]:
        panels[f"{r['op']} ({r['group']})"].append(r)
    names = sorted(panels)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = sorted(panels[name], key=lambda r: r["size_bytes"])
        x = [p["size_bytes"] for p in pts]
        ax.loglog(x, [p["measured_s"] for p in pts], "o", color="#222222", label="measured")
        ax.loglog(x, [p["simulator_s"] for p in pts], "-", color="#4C78A8", label="simulator model")
        ax.loglog(x, [p["algorithm_s"] for p in pts], "--", color="#F58518", label="algorithm model")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("size (bytes)", fontsize=8)
        ax.set_ylabel("time (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90, metadata=PNG_METADATA)


def write_report(out: Path, doc: dict[str, Any], markdown: str, plot: bool = True,
                 extra: dict[str, Any] | None = None) -> Path:
    """``result.json`` + ``report.md`` (+ ``measured_vs_predicted.png``; + ``extra`` JSON files)."""
    with atomic_dir(out, "report") as tmp:
        (tmp / "result.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        (tmp / "report.md").write_text(markdown)
        if plot and doc.get("comparison"):
            plot_bench(doc, tmp / "measured_vs_predicted.png")
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, sort_keys=True) + "\n")
    return out
