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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from tensorstage.errors import SpecError
from tensorstage.parallel.mesh import Mesh
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import Program
from tensorstage.sim import Execution, SimResult, execute, machine_from_system, summarize

#: Node events kept in a timeline JSON (earliest first): ~250 bytes each, so ~125 MB at most.
TIMELINE_MAX_EVENTS = 500_000


@dataclass
class SimRun:
    """Everything one simulation produced, plus what it was run on (for JSON and reports)."""

    programs: list[Program]
    mesh: Mesh
    execution: Execution
    result: SimResult
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        from tensorstage.report.summary import result_dict

        return result_dict(self.result, self.inputs, self.notes)

    def title(self) -> str:
        what = self.inputs.get("model") or self.inputs.get("trace") or "trace"
        return f"{what} on {self.inputs.get('system', '?')} ({self.result.world:,} GPUs): simulated step"


def _run(programs: list[Program], mesh: Mesh, machine: Any, tokens: int, inputs: dict[str, Any],
         notes: list[str] | None = None) -> SimRun:
    ex = execute(programs, mesh, machine)
    return SimRun(programs, mesh, ex, summarize(ex, tokens), inputs, list(notes or []))


def model_inputs(model: str, system: str, plan: ParallelPlan) -> dict[str, Any]:
    """What a model run records (also stored as a trace manifest's ``inputs``)."""
    return {"source": "model", "model": model, "system": system, "dtype": plan.dtype, "plan": plan.summary()}


def simulate_lowered(lowered: Any, model: str, system: str) -> SimRun:
    """Simulate an already lowered model (``tensorstage.lower.Lowered``) on preset/YAML ``system``."""
    from tensorstage.hardware import load_system

    plan = lowered.plan
    spec = load_system(system, plan.world)
    machine = machine_from_system(spec, plan.dtype)
    inputs = model_inputs(model, system, plan)
    inputs["tokens_per_step"] = lowered.tokens_per_step
    return _run(lowered.programs, lowered.mesh, machine, lowered.tokens_per_step, inputs)


def lower_model(model: str, plan: ParallelPlan) -> Any:
    """``resolve_model`` + ``lower`` with fused compute runs (same step time, fewer nodes; bad names and
    plans raise ``SpecError``)."""
    from tensorstage.lower import lower
    from tensorstage.model import resolve_model

    return lower(resolve_model(model), plan, fuse=True)


def simulate_steady(model: str, system: str, plan: ParallelPlan) -> SimRun | None:
    """The step extrapolated from three short simulations (:func:`tensorstage.sim.steady.simulate_steady`),
    or ``None`` if the plan does not qualify or the results are not affine in the micro-batch count."""
    from tensorstage.sim.steady import simulate_steady as steady

    got = steady(plan, lambda p: simulate_lowered(lower_model(model, p), model, system), lambda r: r.result)
    if got is None:
        return None
    res, last, counts = got
    inputs = model_inputs(model, system, plan)
    inputs["tokens_per_step"] = plan.global_batch * plan.seq
    note = (f"step extrapolated from {', '.join(map(str, counts))} micro-batches to {plan.microbatches} "
            "(every additive result checked affine in the micro-batch count; --full simulates every node); "
            f"a pipeline timeline plot shows the {counts[2]}-micro-batch step")
    return SimRun(last.programs, last.mesh, last.execution, res, inputs, [note])


def simulate_model(model: str, system: str, plan: ParallelPlan, full: bool = True) -> SimRun:
    """Lower ``model`` under ``plan`` and simulate it on ``system`` sized to the plan's world.

    With ``full=False`` a long step (many micro-batches) is extrapolated from three short ones
    when that is exact (:func:`simulate_steady`); the run's execution is then the last short one.
    """
    from tensorstage.hardware import load_system

    load_system(system, plan.world)  # fail fast on a bad system before the (slower) lowering
    if not full:
        run = simulate_steady(model, system, plan)
        if run is not None:
            return run
    return simulate_lowered(lower_model(model, plan), model, system)


def simulate_trace(directory: str | Path, system: str | None = None, dtype: str | None = None,
                   tokens_per_step: int | None = None) -> SimRun:
    """Simulate a Chakra trace directory; unset arguments default to the manifest's recorded inputs."""
    from tensorstage.hardware import load_system
    from tensorstage.trace.to_programs import machine_for_trace, programs_from_trace

    trace = programs_from_trace(directory)
    rec = trace.inputs
    system = system or rec.get("system")
    if not system:
        raise SpecError("system", "--system is required: the trace does not record one")
    plan = rec.get("plan") if isinstance(rec.get("plan"), dict) else {}
    dtype = dtype or rec.get("dtype") or plan.get("dtype") or "bf16"
    if tokens_per_step is None:
        tokens_per_step = int(rec.get("tokens_per_step", 0))
    machine = machine_for_trace(machine_from_system(load_system(system, trace.mesh.world), dtype), trace)
    inputs = {"source": "trace", "trace": Path(directory).name, "trace_kind": trace.source,
              "system": system, "dtype": dtype, "tokens_per_step": tokens_per_step}
    if rec.get("model"):
        inputs["model"] = rec["model"]
    if plan:
        inputs["plan"] = plan
    return _run(trace.programs, trace.mesh, machine, tokens_per_step, inputs, trace.notes)


def write_outputs(run: SimRun, json_out: bool, timeline: Path | None, report: Path | None) -> None:
    """The command's outputs: JSON or tables on stdout, optional timeline and report."""
    from tensorstage.report.console import print_json
    from tensorstage.report.simreport import write_report
    from tensorstage.report.summary import print_summary
    from tensorstage.sim.timeline import write_chrome_trace

    data = run.data()
    if timeline is not None:
        Path(timeline).parent.mkdir(parents=True, exist_ok=True)
        write_chrome_trace(run.execution, timeline, max_events=TIMELINE_MAX_EVENTS)
    if report is not None:
        write_report(report, data, run.execution, run.title())
    if json_out:
        print_json(data)
    else:
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
        system: str | None = typer.Option(None, "--system", help="System preset or YAML (sized to the plan)."),
        trace: Path | None = typer.Option(None, "--trace", help="Simulate Chakra ET files in this directory."),
        trace_dtype: str | None = typer.Option(None, "--trace-dtype", help="Compute dtype for --trace (default: recorded)."),
        tokens: int | None = typer.Option(None, "--tokens-per-step", help="Tokens per step for --trace tokens/s."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        timeline: Path | None = typer.Option(None, "--timeline", help="Write a Chrome/Perfetto trace JSON here."),
        report: Path | None = typer.Option(None, "--report", help="Write report.md, report.html and plots here."),
        full: bool = typer.Option(False, "--full", help="Simulate every micro-batch (no steady-state "
                                  "extrapolation; implied by --timeline)."),
    ) -> None:
        """Simulate one step: step time, tokens/s, MFU/HFU, exposed comm, bubbles, peak memory."""
        if report is not None:
            from tensorstage.fileio import require_replaceable_dir

            require_replaceable_dir(report, "report")  # before the simulation, not after it
        if timeline is not None and timeline.is_dir():
            raise SpecError("timeline", f"{timeline} is a directory; give a file path (e.g. step.json)")
        if trace is not None:
            if model is not None:
                raise SpecError("model", "give a MODEL or --trace, not both")
            if plan != ParallelPlan.parse({}):  # silently ignoring them would mislead
                raise SpecError("plan", "plan flags and -c do not apply to --trace: the traces fix the plan "
                                "(use --trace-dtype for the compute dtype)")
            run = simulate_trace(trace, system, trace_dtype, tokens)
        else:
            if model is None:
                raise SpecError("model", "missing MODEL (or --trace DIR)")
            if trace_dtype is not None or tokens is not None:
                raise SpecError("trace", "--trace-dtype and --tokens-per-step apply only to --trace "
                                "(use --dtype; tokens per step follow from the plan)")
            if system is None:
                raise SpecError("system", "--system is required", _system_names())
            run = simulate_model(model, system, plan, full=full or timeline is not None)
        write_outputs(run, json_out, timeline, report)


def _system_names() -> list[str]:
    from tensorstage.hardware import system_names

    return system_names()
