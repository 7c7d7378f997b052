"""``tensorstage simulate``: one training step on the built-in simulator, from a model + plan or a trace.

* ``simulate MODEL --system SYSTEM [plan flags | -c plan.yaml]``: lower the model under the plan
  (:func:`tensorstage.lower.lower`) and simulate the Programs on the system resized to the
  plan's world size. No files needed.
* ``simulate --trace DIR [--system SYSTEM]``: simulate Chakra ET files
  (:mod:`tensorstage.trace.to_programs` says what is supported). For our own traces the system,
  dtype and tokens per step default to what the manifest recorded.

Steps with many micro-batches (about 3.4x the virtual pipeline stages or more) are extrapolated from three
short simulations past the warm-up when every result is checked affine in the micro-batch count
(:mod:`tensorstage.sim.steady`; exact for periodic schedules, else it falls back); ``--full``
and ``--timeline`` simulate every node. A ``--report`` of an extrapolated step draws its pipeline
timeline from the last short simulation (said in the report's notes).

``--json`` prints :func:`tensorstage.report.summary.result_dict`; ``--timeline FILE`` writes the
Chrome/Perfetto trace of the step; ``--report DIR`` writes the Markdown/HTML report with plots.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from tensorstage import api
from tensorstage.api import TIMELINE_MAX_EVENTS, SimRun
from tensorstage.errors import SpecError
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.report.console import status


def write_outputs(run: SimRun, json_out: bool, timeline: Path | None, report: Path | None) -> None:
    """The command's outputs: JSON or tables on stdout, optional timeline and report."""
    from tensorstage.report.console import print_json
    from tensorstage.report.simreport import write_report
    from tensorstage.report.summary import print_summary
    from tensorstage.sim.timeline import write_chrome_trace

    data = run.data()
    plan = data.get("inputs", {}).get("plan")
    if timeline is not None:
        try:
            Path(timeline).parent.mkdir(parents=True, exist_ok=True)
            write_chrome_trace(run.execution, timeline, max_events=TIMELINE_MAX_EVENTS)
        except OSError as exc:  # the option and the user's path
            from tensorstage.fileio import os_reason

            raise SpecError("timeline", f"cannot write {timeline}: {os_reason(exc)}") from None
    if report is not None:
        write_report(report, data, run.execution, run.title())
    if json_out:
        print_json(data)
    else:
        if isinstance(plan, dict):
            with contextlib.suppress(SpecError):  # a foreign manifest's plan: the tables say the GPUs
                typer.echo(api.describe_plan(ParallelPlan.parse(
                    {k: v for k, v in plan.items() if k in ParallelPlan.model_fields})))
        print_summary(data)
        if report is not None:
            typer.echo(f"report: {Path(report) / 'report.md'}")
        if timeline is not None:
            typer.echo(f"timeline: {timeline}")


def register(app: typer.Typer) -> None:
    from tensorstage.commands.planopts import with_plan_options

    @app.command("simulate")
    @with_plan_options
    def simulate(
        model: str | None = typer.Argument(None, help="Model preset, HF config.json or YAML (omit with --trace)."),
        plan: ParallelPlan = None,  # type: ignore[assignment]  # filled in by with_plan_options
        plan_choice: api.PlanChoice | None = None,
        system: str | None = typer.Option(None, "--system", help="System preset or YAML (sized to the plan)."),
        trace: Path | None = typer.Option(None, "--trace", help="Simulate Chakra ET files in this directory."),
        trace_dtype: str | None = typer.Option(None, "--trace-dtype", help="Compute dtype for --trace (default: recorded)."),
        tokens: int | None = typer.Option(None, "--tokens-per-step", help="Tokens per step for --trace tokens/s."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        timeline: Path | None = typer.Option(None, "--timeline", help="Write a Chrome/Perfetto trace JSON here."),
        report: Path | None = typer.Option(None, "--report", help="Write report.md, report.html and plots here."),
        force: bool = typer.Option(False, "--force", help="Let --timeline overwrite a file that is not an "
                                   "earlier tensorstage timeline."),
        full: bool = typer.Option(False, "--full", help="Simulate every micro-batch (no steady-state "
                                  "extrapolation; implied by --timeline)."),
    ) -> None:
        """Simulate one step: step time, tokens/s, MFU/HFU, exposed comm, bubbles, peak memory."""
        if report is not None:
            from tensorstage.fileio import require_replaceable_dir, require_writable_dir

            require_replaceable_dir(report, "report")  # before the simulation, not after it
            require_writable_dir(report, "report")
        if timeline is not None:
            from tensorstage.fileio import require_replaceable_file, require_writable_dir
            from tensorstage.sim.timeline import TIMELINE_PREFIX

            require_replaceable_file(timeline, "timeline", TIMELINE_PREFIX, force)
            require_writable_dir(timeline, "timeline")
        if trace is not None:
            if model is not None:
                raise SpecError("model", "give a MODEL or --trace, not both")
            # plan flags or -c: silently ignoring them would mislead
            if plan_choice is not None and (plan_choice.given or plan_choice.base != "default"):
                raise SpecError("plan", "plan flags and -c do not apply to --trace: the traces fix the plan "
                                "(use --trace-dtype for the compute dtype)")
            run = api.simulate_trace(trace, system, trace_dtype, tokens)
        else:
            if model is None:
                raise SpecError("model", "missing MODEL (or --trace DIR)")
            if trace_dtype is not None or tokens is not None:
                raise SpecError("trace", "--trace-dtype and --tokens-per-step apply only to --trace "
                                "(use --dtype; tokens per step follow from the plan)")
            if system is None:
                raise SpecError("system", "--system is required", _system_names())
            notes = list(plan_choice.notes) if json_out and plan_choice else None  # human output: on stderr
            with status(f"lowering and simulating {model} on {plan.world:,} GPUs ..."):
                run = api.simulate(model, system, plan, full=full or timeline is not None, notes=notes)
        write_outputs(run, json_out, timeline, report)


def _system_names() -> list[str]:
    from tensorstage.hardware import system_names

    return system_names()
