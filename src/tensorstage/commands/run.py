"""``tensorstage run``: the main job. Model + plan + system -> Chakra traces, simulated step, report.

With no arguments it runs :data:`tensorstage.api.DEFAULT_MODEL` on :data:`~tensorstage.api.DEFAULT_SYSTEM`
with :data:`~tensorstage.api.DEFAULT_PLAN` (Llama-3.1-8B on one 8x H100 node: TP 2, PP 2, DP 2, 1F1B,
sequence parallel, distributed optimizer), small enough to finish in seconds and still show every
effect the report plots: tensor-parallel collectives, a pipeline schedule with bubbles and
data-parallel gradient reduction. Plan flags override the default plan (the same one every command
uses); ``-c plan.yaml`` replaces it. The work is :func:`tensorstage.api.run`.

Output directory (written atomically; default ``./tensorstage-out``)::

    traces/          Chakra ET files (+ manifest, comm groups, class JSON) for ASTRA-sim or `simulate --trace`
    result.json      the `simulate --json` result
    timeline.json    Chrome / Perfetto trace of the simulated step
    report.md        report (also report.html) with timeline.png, time_breakdown.png, memory_breakdown.png
"""

from __future__ import annotations

from pathlib import Path

import typer

from tensorstage import api
from tensorstage.api import DEFAULT_MODEL, DEFAULT_SYSTEM, PER_RANK_TRACE_LIMIT, TRACE_MODES
from tensorstage.commands.planopts import with_plan_options
from tensorstage.interrupts import cancel_on_interrupt
from tensorstage.parallel.plan import ParallelPlan

DEFAULT_OUT = Path("tensorstage-out")


def register(app: typer.Typer) -> None:
    @app.command("run")
    @with_plan_options
    def run(
        model: str = typer.Argument(DEFAULT_MODEL, help="Model preset, HF config.json or YAML."),
        plan: ParallelPlan = None,  # type: ignore[assignment]  # filled in by the decorator
        plan_choice: api.PlanChoice | None = None,
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System preset or YAML (sized to the plan)."),
        out: Path = typer.Option(DEFAULT_OUT, "--out", help="Output directory (replaced atomically)."),
        traces: str = typer.Option("auto", "--traces",
                                   help=f"Chakra output: {', '.join(TRACE_MODES)} (auto: per-rank up to "
                                        f"{PER_RANK_TRACE_LIMIT} ranks, else one file per class)."),
        workers: int = typer.Option(1, "--workers", min=0, help="Trace writer processes; 0 = one per CPU "
                                                 "(output is identical for any count)."),
        as_json: bool = typer.Option(False, "--json", help="Print result.json (the simulate --json result)."),
    ) -> None:
        """Main job: lower MODEL, write Chakra traces, simulate a step and write a report with plots."""
        from tensorstage.report.console import console, print_json, status

        notes = list(plan_choice.notes) if plan_choice else None
        with cancel_on_interrupt(), status(f"running {model} on {plan.world:,} GPUs ..."):  # Ctrl-C: one line,
            done = api.run(model, system, plan, out, traces=traces, workers=workers, notes=notes)  # no traceback
        data = done.data
        if as_json:  # the same document as out/result.json, so scripts need not read the file back
            print_json(data)
            return
        console.print(f"{model} on {system}", highlight=False, soft_wrap=True)
        console.print(api.describe_plan(plan), highlight=False, soft_wrap=True)
        console.print(f"step {data['step_time_s']:.3f} s | {data['tokens_per_s']:,.0f} tokens/s | "
                      f"MFU {data['mfu']:.1%} | HFU {data['hfu']:.1%} | peak memory "
                      f"{data['peak_memory_bytes'] / 2**30:.2f} / {data['hbm_capacity_bytes'] / 2**30:.2f} GiB"
                      + (" (OOM)" if data["oom"] else ""), highlight=False, soft_wrap=True)
        console.print(f"report: {done.report}", highlight=False, soft_wrap=True)
