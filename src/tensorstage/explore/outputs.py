"""What a study writes next to its store: trial table, best configuration and plan, Pareto front,
convergence plot, parameter sensitivity.

Every file is written atomically and deterministically (sorted keys, trial order, no wall-clock
times, PNG without software metadata), so the same study gives byte-identical files.
``best_plan.yaml`` holds the plan keys of the best trial: ``tensorstage simulate MODEL --system SYS
-c best_plan.yaml`` runs it unchanged; a study that varied the network or device also writes
``best_system.yaml`` to pass as ``--system``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tensorstage.explore.evaluate import PRUNED
from tensorstage.explore.search import StudyResult
from tensorstage.explore.setup import build_system, make_task
from tensorstage.explore.space import METRICS, Space
from tensorstage.explore.study import Trial, pareto_front
from tensorstage.fileio import write_bytes_atomic, write_text_atomic


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    return f"{v:.9g}" if isinstance(v, float) else v


def trial_rows(space: Space, trials: Sequence[Trial]) -> list[list[Any]]:
    """The trial table: number, status, source, parameters, derived values, objectives, metrics, message."""
    names = [*space.names, *space.derived]
    head = ["number", "status", "source", *names, *(f"objective:{o.name}" for o in space.objectives), *METRICS,
            "message"]
    rows = [head]
    for t in trials:
        objs = t.objectives or [None] * len(space.objectives)
        rows.append([t.number, t.status, t.source, *(_fmt(t.params.get(n)) for n in names),
                     *(_fmt(v) for v in objs), *(_fmt(t.metrics.get(m)) for m in METRICS), t.message])
    return rows


def pareto_trials(res: StudyResult) -> list[Trial]:
    """Feasible trials no other feasible trial beats in every objective."""
    ok = res.feasible()
    if not ok:
        return []
    signs = np.array([o.sign() for o in res.space.objectives])
    pts = np.array([t.objectives for t in ok], dtype=float) * signs
    return [ok[i] for i in pareto_front(pts)]


def convergence(res: StudyResult) -> tuple[np.ndarray, np.ndarray]:
    """Best first objective so far (as reported) after each full or fast evaluation: what the budget
    counts, so a screen-pruned trial (stored with source ``fast``, never evaluated) is not one."""
    sign = res.space.objectives[0].sign()
    best, xs, ys = np.inf, [], []
    n = 0
    for t in res.trials:
        if t.source not in ("full", "fast") or t.status == PRUNED:
            continue
        n += 1
        if t.objectives is not None and t.status == "ok":
            best = min(best, sign * t.objectives[0])
        if np.isfinite(best):
            xs.append(n)
            ys.append(sign * best)
    return np.array(xs), np.array(ys)


def plot_convergence(curves: dict[str, tuple[np.ndarray, np.ndarray]], ylabel: str, path: Path,
                     reference: float | None = None) -> None:
    """Best-so-far against evaluations, one line per agent (``reference``: a known optimum)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tensorstage.report.plots import DPI, PNG_METADATA

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in sorted(curves):
        x, y = curves[name]
        if len(x):
            ax.step(x, y, where="post", label=name)
    if reference is not None:
        ax.axhline(reference, color="#9E9E9E", linestyle="--", label="exhaustive optimum")
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"best {ylabel}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing feasible yet: no curve to name
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    write_bytes_atomic(path, buf.getvalue())


def sensitivity_rows(res: StudyResult) -> list[list[Any]]:
    """Per parameter value: feasible trials, best and mean first objective (a one-at-a-time view
    of how much each knob matters in what was sampled)."""
    rows: list[list[Any]] = [["parameter", "value", "trials", "best", "mean"]]
    ok = res.feasible()
    sign = res.space.objectives[0].sign()
    for p in res.space.parameters:
        for v in p.values:
            vals = [t.objectives[0] for t in ok if t.params.get(p.name) == v]  # type: ignore[index]
            if vals:
                best = min(vals) if sign > 0 else max(vals)
                rows.append([p.name, v, len(vals), _fmt(float(best)), _fmt(float(np.mean(vals)))])
            else:
                rows.append([p.name, v, 0, "", ""])
    return rows


def best_plan_dict(space: Space, trial: Trial) -> dict[str, Any]:
    """The plan YAML mapping of a trial (the space's fixed keys plus its plan parameters)."""
    return dict(sorted(make_task(space.model, space.system, space.gpus, space.fixed, trial.params).plan.items()))


def write_outputs(res: StudyResult, out: str | Path) -> dict[str, Path]:
    """Write the study's files into ``out``; returns them by role."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sp = res.space
    files = {"trials": out / "trials.csv", "pareto": out / "pareto.csv", "sensitivity": out / "sensitivity.csv",
             "summary": out / "summary.json", "convergence": out / "convergence.png"}
    write_text_atomic(files["trials"], _csv(trial_rows(sp, res.trials)))
    write_text_atomic(files["pareto"], _csv(trial_rows(sp, pareto_trials(res))))
    write_text_atomic(files["sensitivity"], _csv(sensitivity_rows(res)))
    best = res.best()
    summary: dict[str, Any] = {
        "space": sp.name, "model": sp.model, "system": sp.system, "gpus": sp.gpus, "agent": res.agent,
        "evaluations": res.evaluations, "trials": len(res.trials),
        "by_status": {s: sum(t.status == s for t in res.trials) for s in sorted({t.status for t in res.trials})},
        "objectives": [{"name": o.name, "goal": o.goal} for o in sp.objectives],
        "best": None if best is None else {"number": best.number, "params": best.params,
                                          "objectives": best.objectives, "metrics": best.metrics},
        "pareto": [t.number for t in pareto_trials(res)],
    }
    if best is not None:
        files["best_plan"] = out / "best_plan.yaml"
        write_text_atomic(files["best_plan"], yaml.safe_dump(best_plan_dict(sp, best), sort_keys=True))
        task = make_task(sp.model, sp.system, sp.gpus, sp.fixed, best.params)
        if task.network or task.device:
            from tensorstage.hardware.system import write_system_yaml

            files["best_system"] = write_system_yaml(build_system(*task.system_key()), out / "best_system.yaml")
            summary["best_system"] = "best_system.yaml"
    write_text_atomic(files["summary"], json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    plot_convergence({res.agent: convergence(res)}, sp.objectives[0].name, files["convergence"])
    return files
