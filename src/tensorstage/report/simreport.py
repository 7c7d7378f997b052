"""The simulation report: ``report.md`` + ``report.html`` + three PNG plots, written atomically.

Content depends only on the inputs and the simulated step (no timestamps, no absolute paths, no
version strings in the PNGs), so two runs of the same command give byte-identical directories.
The HTML page shows the same tables and plots as the Markdown, for people without a Markdown viewer.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorstage.fileio import atomic_dir
from tensorstage.report.plots import memory_breakdown_png, time_breakdown_png, timeline_png
from tensorstage.sim.engine import Execution

#: Plan fields the report lists (the full plan is in the JSON result).
PLAN_KEYS = ("world", "tp", "pp", "vpp", "dp", "cp", "ep", "sp", "zero", "schedule", "recompute", "seq",
             "global_batch", "micro_batch", "microbatches", "dtype", "phase")
PLOTS = {"timeline": "timeline.png", "time": "time_breakdown.png", "memory": "memory_breakdown.png"}


def write_json(path: Path, data: Any) -> Path:
    """Indented, key-order-preserving JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def _s(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1:
        return f"{x:.3f} s"
    if abs(x) >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} us"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else ":---" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _top(d: Mapping[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def sections(data: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """The report as ``(heading, markdown lines)`` sections (shared by the Markdown and HTML writers)."""
    inp = data.get("inputs", {})
    classes = data["breakdown"]["classes"]
    out: list[tuple[str, list[str]]] = []
    what = [f"- **{k}**: `{v}`" for k, v in inp.items() if not isinstance(v, dict)]
    plan = inp.get("plan")
    if isinstance(plan, dict):
        shown = [k for k in PLAN_KEYS if k in plan]
        what.append("- **plan**: " + ", ".join(f"{k}={plan[k]}" for k in shown)
                    + " (all fields: result.json / --json)")
    out.append(("Inputs", what or ["(none recorded)"]))
    summary = [
        ["step time", _s(data["step_time_s"])],
        ["tokens / s", f"{data['tokens_per_s']:,.0f}"],
        ["tokens / step", f"{data['tokens_per_step']:,}"],
        ["MFU", f"{data['mfu']:.1%}"],
        ["HFU", f"{data['hfu']:.1%}"],
        ["GPUs", f"{data['world']:,}"],
        ["peak memory (worst class)", _gib(data["peak_memory_bytes"])],
        ["HBM capacity", _gib(data["hbm_capacity_bytes"])],
        ["fits in memory", "no (OOM)" if data["oom"] else "yes"],
    ]
    out.append(("Summary", _table(["metric", "value"], summary)))
    rows = []
    for c in classes:
        rows.append([c["class"], f"{c['ranks']:,}", _s(c["compute_s"]["total"]), _s(c["exposed_comm_s"]["total"]),
                     _s(c["bubble_s"]), _s(c["optimizer_s"]), _gib(c["memory"]["peak_bytes"])])
    lines = ["Each class's compute + exposed communication + bubble = step time.", ""]
    lines += _table(["class", "ranks", "compute", "exposed comm", "bubble", "optimizer", "peak memory"], rows)
    lines += ["", f"![time breakdown]({PLOTS['time']})"]
    out.append(("Time per rank class", lines))
    worst = max(classes, key=lambda c: (c["compute_s"]["total"], c["class"])) if classes else None
    if worst is not None:
        lines = [f"Busiest class `{worst['class']}`: compute by category, then the largest ops and exposed "
                 "communication by type/axes.", ""]
        lines += _table(["category", "time"], [[k, _s(v)] for k, v in _top(worst["compute_s"]["by_category"], 12)])
        lines += [""] + _table(["op", "time"], [[k, _s(v)] for k, v in _top(worst["compute_s"]["by_op"], 10)])
        exp = worst["exposed_comm_s"]["by_type_axis"]
        if exp:
            lines += [""] + _table(["exposed communication", "time"], [[k, _s(v)] for k, v in _top(exp, 10)])
        out.append(("Where the time goes", lines))
    lines = [f"![pipeline timeline]({PLOTS['timeline']})", "",
             "One row per rank class; bars are the compute stream coloured by category, thin bars under "
             "them communication in flight."]
    out.append(("Pipeline schedule", lines))
    mem_rows = []
    cats: list[str] = []
    for c in classes:
        for k in c["memory"]["by_category_bytes"]:
            if k not in cats:
                cats.append(k)
    for c in classes:
        m = c["memory"]["by_category_bytes"]
        mem_rows.append([c["class"], *[_gib(m.get(k, 0)) for k in cats], _gib(c["memory"]["peak_bytes"]),
                         "OOM" if c["memory"]["oom"] else "ok"])
    lines = _table(["class", *cats, "peak", "fits"], mem_rows)
    lines += ["", f"HBM capacity per device: {_gib(data['hbm_capacity_bytes'])}.", "",
              f"![memory breakdown]({PLOTS['memory']})"]
    out.append(("Memory at the peak", lines))
    notes = list(data.get("notes", []))
    notes.append("Definitions: tensorstage.sim.result (time decomposition, memory timeline) and "
                 "tensorstage.sim.compute / collectives / machine (cost models and their assumptions).")
    out.append(("Notes", [f"- {n}" for n in notes]))
    return out


def markdown(data: Mapping[str, Any], title: str) -> str:
    lines = [f"# {title}", ""]
    for head, body in sections(data):
        lines += [f"## {head}", "", *body, ""]
    return "\n".join(lines)


def _md_inline_to_html(text: str) -> str:
    out = html.escape(text)
    parts = out.split("`")
    out = "".join(p if i % 2 == 0 else f"<code>{p}</code>" for i, p in enumerate(parts))
    parts = out.split("**")
    return "".join(p if i % 2 == 0 else f"<b>{p}</b>" for i, p in enumerate(parts))


def _html_block(lines: list[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, body = rows[0], rows[2:]
            t = ["<table>", "<tr>" + "".join(f"<th>{_md_inline_to_html(c)}</th>" for c in head) + "</tr>"]
            t += ["<tr>" + "".join(f"<td>{_md_inline_to_html(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("\n".join(t + ["</table>"]))
            continue
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<p><img src="{html.escape(src[:-1])}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            out.append(f"<li>{_md_inline_to_html(line[2:])}</li>")
        elif line:
            out.append(f"<p>{_md_inline_to_html(line)}</p>")
        i += 1
    return "\n".join(out)


def html_page(data: Mapping[str, Any], title: str) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%}")
    body = [f"<h1>{html.escape(title)}</h1>"]
    for head, lines in sections(data):
        body += [f"<h2>{html.escape(head)}</h2>", _html_block(lines)]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title)
            + f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report_files(directory: str | Path, data: Mapping[str, Any], ex: Execution, title: str) -> list[Path]:
    """Write report.md, report.html and the PNGs into an existing ``directory``; returns the paths."""
    d = Path(directory)
    classes = data["breakdown"]["classes"]
    paths = [
        timeline_png(ex, d / PLOTS["timeline"]),
        time_breakdown_png(classes, data["step_time_s"], d / PLOTS["time"]),
        memory_breakdown_png(classes, data["hbm_capacity_bytes"], d / PLOTS["memory"]),
    ]
    md = d / "report.md"
    md.write_text(markdown(data, title), encoding="utf-8")
    page = d / "report.html"
    page.write_text(html_page(data, title), encoding="utf-8")
    return [md, page, *paths]


def write_report(out_dir: str | Path, data: Mapping[str, Any], ex: Execution, title: str) -> Path:
    """:func:`write_report_files` into ``out_dir`` atomically (replaces an existing directory)."""
    with atomic_dir(out_dir, "report") as tmp:
        write_report_files(tmp, data, ex, title)
    return Path(out_dir) / "report.md"
