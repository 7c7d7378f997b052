"""``tensorstage run``: the main job. Model + plan + system -> Chakra traces, simulated step, report.

With no arguments it runs :data:`DEFAULT_MODEL` on :data:`DEFAULT_SYSTEM` with :data:`DEFAULT_PLAN`
(Llama-3.1-8B on one 8x H100 node: TP 2, PP 2, DP 2, 1F1B, sequence parallel, distributed
optimizer), small enough to finish in seconds and still show every effect the report plots:
tensor-parallel collectives, a pipeline schedule with bubbles and data-parallel gradient
reduction. Plan flags override the default plan; ``-c plan.yaml`` replaces it.

Output directory (written atomically; default ``./tensorstage-out``)::

    traces/          Chakra ET files (+ manifest, comm groups, class JSON) for ASTRA-sim or `simulate --trace`
    result.json      the `simulate --json` result
    timeline.json    Chrome / Perfetto trace of the simulated step
    report.md        report (also report.html) with timeline.png, time_breakdown.png, memory_breakdown.png
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from tensorstage.commands.planopts import CONFIG_PARAM, PLAN_FLAG_NAMES, plan_from_options, plan_parameters
from tensorstage.errors import SpecError
from tensorstage.fileio import require_replaceable_dir
from tensorstage.parallel.plan import ParallelPlan

DEFAULT_MODEL = "llama3.1-8b"
DEFAULT_SYSTEM = "dgx-h100-superpod"
DEFAULT_PLAN: dict[str, Any] = {
    "tp": 2, "pp": 2, "dp": 2, "sp": True, "zero": 1, "schedule": "1f1b", "recompute": "selective",
    "seq": 4096, "global_batch": 16, "micro_batch": 1,
}
DEFAULT_OUT = Path("tensorstage-out")
#: Above this many ranks the traces are written classes-only (one file per rank class).
PER_RANK_TRACE_LIMIT = 1024
TRACE_MODES = ("auto", "per-rank", "classes", "none")


def run_plan(config: Path | None, flags: dict[str, Any]) -> ParallelPlan:
    """The plan of ``run``: ``-c`` YAML + flags as everywhere, else :data:`DEFAULT_PLAN` + flags."""
    if config is not None:
        return plan_from_options(config, **flags)
    merged = dict(DEFAULT_PLAN)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return plan_from_options(None, **merged)


def _with_run_plan(func: Callable[..., Any]) -> Callable[..., Any]:
    """Like ``with_plan_options`` but defaulting to :data:`DEFAULT_PLAN` when no ``-c`` is given."""
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "plan"]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.pop(CONFIG_PARAM, None)
        flags = {k: kwargs.pop(k) for k in PLAN_FLAG_NAMES if k in kwargs}
        return func(*args, plan=run_plan(config, flags), **kwargs)

    params = own + plan_parameters()
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__
    return wrapper


def run_job(model: str, system: str, plan: ParallelPlan, out: Path, traces: str = "auto",
            workers: int = 1) -> tuple[Path, dict[str, Any]]:
    """Lower, write traces, simulate, write result/timeline/report into ``out`` (atomically).

    Returns the report path and the result dict.
    """
    from tensorstage.commands.simulate import TIMELINE_MAX_EVENTS, lower_model, model_inputs, simulate_lowered
    from tensorstage.fileio import atomic_dir
    from tensorstage.hardware import load_system
    from tensorstage.report.simreport import write_json, write_report_files
    from tensorstage.sim.timeline import write_chrome_trace
    from tensorstage.trace import write_chakra

    if traces not in TRACE_MODES:
        raise SpecError("traces", f"unknown trace mode {traces!r}", TRACE_MODES)
    require_replaceable_dir(out)  # fail before the work, not after it
    load_system(system, plan.world)  # bad system: fail before lowering
    lowered = lower_model(model, plan)
    run = simulate_lowered(lowered, model, system)
    data = run.data()
    mode = traces
    if mode == "auto":
        mode = "per-rank" if plan.world <= PER_RANK_TRACE_LIMIT else "classes"
    with atomic_dir(out) as tmp:
        if mode != "none":
            inputs = model_inputs(model, system, plan)
            inputs["tokens_per_step"] = lowered.tokens_per_step
            write_chakra(lowered.programs, lowered.mesh, tmp / "traces", json=True, progress=False,
                         classes_only=mode == "classes", inputs=inputs, workers=workers)
        write_json(tmp / "result.json", data)
        write_chrome_trace(run.execution, tmp / "timeline.json", max_events=TIMELINE_MAX_EVENTS)
        write_report_files(tmp, data, run.execution, run.title())
    return out / "report.md", data


def register(app: typer.Typer) -> None:
    @app.command("run")
    @_with_run_plan
    def run(
        model: str = typer.Argument(DEFAULT_MODEL, help="Model preset, HF config.json or YAML."),
        plan: ParallelPlan = None,  # type: ignore[assignment]  # filled in by the decorator
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System preset or YAML (sized to the plan)."),
        out: Path = typer.Option(DEFAULT_OUT, "--out", help="Output directory (replaced atomically)."),
        traces: str = typer.Option("auto", "--traces",
                                   help=f"Chakra output: {'|'.join(TRACE_MODES)} (auto: per-rank up to "
                                        f"{PER_RANK_TRACE_LIMIT} ranks, else one file per class)."),
        workers: int = typer.Option(1, "--workers", min=0, help="Trace writer processes; 0 = one per CPU "
                                                 "(output is identical for any count)."),
        as_json: bool = typer.Option(False, "--json", help="Print result.json (the simulate --json result)."),
    ) -> None:
        """Main job: lower MODEL, write Chakra traces, simulate a step and write a report with plots."""
        from tensorstage.report.console import console, print_json

        report, data = run_job(model, system, plan, out, traces, workers)
        if as_json:  # the same document as out/result.json, so scripts need not read the file back
            print_json(data)
            return
        p = plan
        console.print(f"{model} on {system}: {plan.world} GPUs, TP {p.tp} PP {p.pp} DP {p.dp} CP {p.cp}, "
                      f"{p.schedule}, global batch {p.global_batch} x {p.seq} tokens")
        console.print(f"step {data['step_time_s']:.3f} s | {data['tokens_per_s']:,.0f} tokens/s | "
                      f"MFU {data['mfu']:.1%} | HFU {data['hfu']:.1%} | peak memory "
                      f"{data['peak_memory_bytes'] / 2**30:.1f} / {data['hbm_capacity_bytes'] / 2**30:.0f} GiB"
                      + (" (OOM)" if data["oom"] else ""))
        console.print(f"report: {report}")
