"""The stable Python API: what every ``tensorstage`` command does, without typer and without printing.

Why a module of its own: notebooks, searches and other tools need the same orchestration the CLI
runs (model -> plan -> lower -> simulate / traces), and the CLI must not be the only place that
knows it. Commands parse flags, call one function here and print its typed result; tests of
behaviour call this module, tests of the CLI call ``tensorstage.cli.main``.

One default plan (:data:`DEFAULT_PLAN`) serves every command and function: Llama-3.1-8B-sized
training on one 8-GPU node, TP 2 x PP 2 x DP 2, 1F1B, sequence parallel, ZeRO-1, selective
recompute, seq 4096, global batch 16, Megatron-LM's fused kernels (``megatron_fusions``: the
kernels of the framework most published runs use; ``--no-megatron-fusions`` models eager PyTorch).
:func:`make_plan` applies overrides to it field by field
and says, in :attr:`PlanChoice.notes`, when a kept default changes what the overrides imply (the
GPU count, the micro-batches per step).

Example (see ``docs/api.md`` and ``examples/api_tour.py``)::

    from tensorstage import api
    plan = api.make_plan(tp=4)                 # PP 2, DP 2 kept from DEFAULT_PLAN -> 16 GPUs
    run = api.simulate("llama3.1-8b", "dgx-h100-superpod", plan)
    print(run.result.step_time_s, run.result.peak_memory_bytes)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorstage.errors import InputWarning, SpecError
from tensorstage.gcpause import paused_gc
from tensorstage.parallel.plan import ParallelPlan, load_plan, split_rank_order

if TYPE_CHECKING:
    from tensorstage.hardware.system import SystemSpec
    from tensorstage.lower import Lowered
    from tensorstage.model.spec import ModelSpec
    from tensorstage.parallel.mesh import Mesh
    from tensorstage.schedule.program import Program
    from tensorstage.serve import RequestTable, ServingResult, Workload
    from tensorstage.sim import Execution, SimResult
    from tensorstage.validation.cases import Target
    from tensorstage.validation.run import CaseResult

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_PLAN", "DEFAULT_PLAN_VALUES", "DEFAULT_SYSTEM", "Generated", "Plan", "PlanChoice",
    "RunOutput", "Served", "SimRun", "Validation", "choose_plan", "describe_plan", "generate", "load_model",
    "load_system", "lower", "make_plan", "run", "serve", "simulate", "simulate_trace", "validate",
]

DEFAULT_MODEL = "llama3.1-8b"
DEFAULT_SYSTEM = "dgx-h100-superpod"
#: processes for the steady-state extrapolation's three short runs (two forked children beside this
#: process; 1 runs them one after the other): same results, about half the wall time on two cores
STEADY_WORKERS = 2
#: The plan keys the default plan sets; every other key is :class:`ParallelPlan`'s own default.
DEFAULT_PLAN_VALUES: dict[str, Any] = {
    "tp": 2, "pp": 2, "dp": 2, "sp": True, "zero": 1, "schedule": "1f1b", "recompute": "selective",
    "seq": 4096, "global_batch": 16, "micro_batch": 1, "megatron_fusions": True,
}
#: The plan every command and function uses unless told otherwise (8 GPUs).
DEFAULT_PLAN: ParallelPlan = ParallelPlan.parse(DEFAULT_PLAN_VALUES, where="DEFAULT_PLAN")

#: The plan type, re-exported so callers need only ``tensorstage.api``.
Plan = ParallelPlan

#: Node events kept in a timeline JSON (earliest first): ~250 bytes each, so ~125 MB at most.
TIMELINE_MAX_EVENTS = 500_000
#: Above this many ranks ``run`` writes traces classes-only (one file per rank class).
PER_RANK_TRACE_LIMIT = 1024
TRACE_MODES = ("auto", "per-rank", "classes", "none")


# --- plans ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanChoice:
    """A checked plan, where its values came from, and one-line notes about derived changes."""

    plan: ParallelPlan
    #: ``"default"`` (DEFAULT_PLAN + overrides) or the plan file's path.
    base: str
    #: Keys set explicitly by the caller (flags), in the order given.
    given: tuple[str, ...]
    notes: tuple[str, ...] = ()


def _normalise(flags: Mapping[str, Any]) -> dict[str, Any]:
    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(given.get("rank_order"), str):
        given["rank_order"] = split_rank_order(given["rank_order"])
    if isinstance(given.get("pp_layer_split"), str):
        text = given["pp_layer_split"]
        try:
            given["pp_layer_split"] = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
        except ValueError:
            raise SpecError("pp_layer_split", f"expected comma-separated integers, got {text!r}") from None
    return given


def choose_plan(config: str | Path | None = None, **overrides: Any) -> PlanChoice:
    """The plan from :data:`DEFAULT_PLAN` (or, with ``config``, a plan YAML) plus ``overrides``.

    Overrides (``None`` = not given) replace only the keys they name. A plan file replaces the
    default plan as a whole (keys it leaves out take :class:`ParallelPlan`'s own defaults), so a
    file means the same thing to every command. Bad values raise :class:`SpecError`.
    """
    given = _normalise(overrides)
    if "global_batch" in given and given["global_batch"] == 0:  # was silently dp*micro_batch*pp
        raise SpecError("global_batch", "must be >= 1 (sequences per step)")
    if config is not None:
        return PlanChoice(load_plan(config, given), str(config), tuple(given))
    data = dict(DEFAULT_PLAN_VALUES)
    data.update(given)
    try:
        plan = ParallelPlan.parse(data, where="plan")
    except SpecError as exc:
        kept = [k for k in ("global_batch", "seq") if k not in given and exc.field == k]
        if kept:
            hint = ", ".join(f"{k}={DEFAULT_PLAN_VALUES[k]}" for k in kept)
            raise SpecError(exc.field, f"{exc.reason} ({hint} from the default plan; give --"
                            f"{kept[0].replace('_', '-')} to change it)", exc.allowed) from None
        raise
    return PlanChoice(plan, "default", tuple(given), tuple(_derived_notes(plan, given)))


def _derived_notes(plan: ParallelPlan, given: Mapping[str, Any]) -> list[str]:
    """One line per derived quantity that the overrides changed through kept defaults."""
    notes = []
    dims = ("tp", "pp", "dp", "cp")
    if any(d in given for d in dims) and plan.world != DEFAULT_PLAN.world:
        kept = [f"{d}={getattr(plan, d)}" for d in dims if d not in given and getattr(plan, d) > 1]
        if kept:
            notes.append(f"{plan.world:,} GPUs (default plan: {DEFAULT_PLAN.world}): {', '.join(kept)} kept "
                         f"from the default plan (set {' '.join('--' + k.split('=')[0] + ' 1' for k in kept)} "
                         "to change that)")
    if plan.microbatches != DEFAULT_PLAN.microbatches and "global_batch" not in given:
        notes.append(f"{plan.microbatches:,} micro-batches per step (default plan: {DEFAULT_PLAN.microbatches}): "
                     f"global_batch={plan.global_batch} kept from the default plan")
    if DEFAULT_PLAN.sp and not plan.sp and "sp" not in given:
        notes.append("sequence parallelism off: it needs tp > 1")
    return notes


def make_plan(config: str | Path | None = None, **overrides: Any) -> ParallelPlan:
    """:func:`choose_plan` without the provenance: the checked :class:`ParallelPlan`."""
    return choose_plan(config, **overrides).plan


def describe_plan(plan: ParallelPlan) -> str:
    """One line naming the plan and its GPU count, printed by every command."""
    p = plan
    parts = [f"TP {p.tp} PP {p.pp} DP {p.dp}"]
    if p.cp > 1:
        parts[0] += f" CP {p.cp}"
    if p.ep > 1:
        parts[0] += f" EP {p.ep}" + (" ETP 1 (folded over TP)" if p.folded else "")
    if p.vpp > 1:
        parts[0] += f" VPP {p.vpp}"
    parts.append(f"{p.world:,} GPU{'s' if p.world != 1 else ''}")
    parts.append(p.phase if p.phase != "train" else p.schedule)
    if p.sp:
        parts.append("SP")
    if p.zero:
        parts.append(f"ZeRO-{p.zero}")
    if p.recompute != "none":
        parts.append(f"recompute {p.recompute}" + (f" ({', '.join(p.recompute_modules)})" if p.recompute_modules else ""))
    parts.append(f"seq {p.seq:,}")
    if p.phase == "decode":
        parts.append(f"context {p.kv_len:,}")
    parts.append(f"global batch {p.global_batch:,} (micro-batch {p.micro_batch}, {p.microbatches:,} per step)")
    parts.append(p.dtype)
    if p.megatron_fusions:
        parts.append("Megatron kernels")
    if p.tp_comm_overlap:
        parts.append("TP comm overlap")
    return "plan: " + ", ".join(parts)


# --- models, systems, lowering -------------------------------------------------------------------
def load_model(model: str | ModelSpec) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, an HF ``config.json``, a model YAML, or itself."""
    from tensorstage.model import resolve_model
    from tensorstage.model.spec import ModelSpec

    return model if isinstance(model, ModelSpec) else resolve_model(model)


def load_system(system: str | Path | SystemSpec, num_gpus: int | None = None) -> SystemSpec:
    """A :class:`SystemSpec` from a preset name or a system YAML (or itself), resized to ``num_gpus``."""
    from tensorstage.hardware.system import SystemSpec
    from tensorstage.hardware.system import load_system as _load

    if isinstance(system, SystemSpec):
        return system if num_gpus is None else system.with_num_gpus(num_gpus)
    return _load(system, num_gpus)


def _name(obj: str | Path | Any) -> str:
    return obj if isinstance(obj, str) else str(obj) if isinstance(obj, Path) else obj.name


def lower(model: str | ModelSpec, plan: ParallelPlan = DEFAULT_PLAN, fuse: bool = False) -> Lowered:
    """Lower ``model`` under ``plan`` to per-rank-class Programs (:func:`tensorstage.lower.lower`).

    ``fuse=True`` merges compute runs for the simulator (same step time, fewer nodes)."""
    from tensorstage.lower import lower as _lower

    spec = load_model(model)
    try:
        lowered = _lower(spec, plan, fuse=fuse)  # a bad plan is an error first, never a warning then one
    except SpecError as exc:
        if exc.field == "seq" and plan.seq == DEFAULT_PLAN.seq and "default plan" not in exc.reason:
            raise SpecError(exc.field, f"{exc.reason} (seq {plan.seq} is the default plan's; give --seq)",
                            exc.allowed) from None
        raise
    warn_about(spec, plan)
    return lowered


def warn_about(spec: ModelSpec, plan: ParallelPlan) -> None:
    """Warn (:class:`~tensorstage.errors.InputWarning`) about a legal but doubtful combination:
    tokens beyond the model's trained context (``max_seq``; learned positions make it an error
    in :meth:`ParallelPlan.validate_for`)."""
    tokens = max(plan.seq, plan.kv_len)
    if tokens > spec.max_seq and spec.positions != "learned":
        warnings.warn(InputWarning(
            f"seq: {tokens:,} tokens exceed {spec.name}'s maximum context of {spec.max_seq:,} (max_seq); "
            "the numbers assume the model runs at that length anyway"), stacklevel=3)


# --- simulation ----------------------------------------------------------------------------------
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
        """The JSON document of ``simulate --json`` and ``result.json``."""
        from tensorstage.report.summary import result_dict

        return result_dict(self.result, self.inputs, self.notes)

    def title(self) -> str:
        what = self.inputs.get("model") or self.inputs.get("trace") or "trace"
        return f"{what} on {self.inputs.get('system', '?')} ({self.result.world:,} GPUs): simulated step"


def model_inputs(model: str, system: str, plan: ParallelPlan) -> dict[str, Any]:
    """What a model run records (also stored as a trace manifest's ``inputs``)."""
    return {"source": "model", "model": model, "system": system, "dtype": plan.dtype, "plan": plan.summary()}


def _execute(programs: list[Program], mesh: Mesh, machine: Any, tokens: int, inputs: dict[str, Any],
             notes: list[str] | None = None) -> SimRun:
    from tensorstage.sim import execute, summarize

    ex = execute(programs, mesh, machine)
    return SimRun(programs, mesh, ex, summarize(ex, tokens), inputs, list(notes or []))


def simulate_lowered(lowered: Lowered, model: str, system: str | Path | SystemSpec) -> SimRun:
    """Simulate an already lowered model on ``system`` sized to the plan's world."""
    from tensorstage.sim import machine_from_system

    plan = lowered.plan
    spec = load_system(system, plan.world)
    machine = machine_from_system(spec, plan.dtype)
    inputs = model_inputs(model, _name(system), plan)
    inputs["tokens_per_step"] = lowered.tokens_per_step
    return _execute(lowered.programs, lowered.mesh, machine, lowered.tokens_per_step, inputs)


def _simulate_steady(model: str | ModelSpec, system: str | Path | SystemSpec, plan: ParallelPlan) -> SimRun | None:
    """The step extrapolated from short simulations (:func:`tensorstage.sim.steady.simulate_steady`),
    or ``None`` if the plan does not qualify or the results neither are affine in the micro-batch
    count nor settle geometrically."""
    from tensorstage.lower import lower_blocks_cached
    from tensorstage.sim.steady import simulate_steady as steady
    from tensorstage.sim.steady import steady_counts, with_microbatches

    name = _name(model)
    workers = STEADY_WORKERS
    start = steady_counts(plan)
    if start is not None and workers > 1:
        # lower the blocks here, before the short runs fork, so that they all start from the cache;
        # a bad plan is left to the runs, which report it in the CLI's words
        spec = load_model(model)
        short = with_microbatches(plan, start[0])
        try:
            lower_blocks_cached(spec, short, fuse=True)
        except SpecError:
            workers = 1
        else:
            warn_about(spec, short)  # once, here: forked runs inherit the "already shown" record
    got = steady(plan, lambda p: simulate_lowered(lower(model, p, fuse=True), name, system), lambda r: r.result,
                 workers=workers)
    if got is None:
        return None
    res, last, counts = got
    inputs = model_inputs(name, _name(system), plan)
    inputs["tokens_per_step"] = plan.global_batch * plan.seq
    check = ("every additive result checked affine in the micro-batch count" if len(counts) == 3 else
             "every additive result affine in the micro-batch count or settling by a constant factor per "
             "micro-batch, carried to its limit within 0.1 % of the step time")
    note = (f"step extrapolated from {', '.join(map(str, counts))} micro-batches to {plan.microbatches} "
            f"({check}; --full simulates every node); a pipeline timeline plot shows the {counts[-1]}-micro-batch "
            "step")
    return SimRun(last.programs, last.mesh, last.execution, res, inputs, [note])


def simulate(model: str | ModelSpec = DEFAULT_MODEL, system: str | Path | SystemSpec = DEFAULT_SYSTEM,
             plan: ParallelPlan = DEFAULT_PLAN, *, full: bool = False, notes: list[str] | None = None) -> SimRun:
    """Lower ``model`` under ``plan`` and simulate one step on ``system`` sized to the plan's world.

    With ``full=False`` a long step (many micro-batches) is extrapolated from three short ones
    when that is exact; the run's execution is then the last short one (said in ``notes``).
    ``notes`` (e.g. :attr:`PlanChoice.notes`) are put first in the result's notes.
    """
    load_system(system, plan.world)  # fail fast on a bad system before the (slower) lowering
    with paused_gc():  # one pause over lower + simulate (see tensorstage.gcpause)
        got = None if full else _simulate_steady(model, system, plan)
        if got is None:
            got = simulate_lowered(lower(model, plan, fuse=True), _name(model), system)
    got.notes[:0] = list(notes or [])
    return got


def simulate_trace(directory: str | Path, system: str | Path | None = None, dtype: str | None = None,
                   tokens_per_step: int | None = None) -> SimRun:
    """Simulate a Chakra trace directory; unset arguments default to the manifest's recorded inputs."""
    from tensorstage.sim import machine_from_system
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
              "system": str(system), "dtype": dtype, "tokens_per_step": tokens_per_step}
    if rec.get("model"):
        inputs["model"] = rec["model"]
    if plan:
        inputs["plan"] = plan
    return _execute(trace.programs, trace.mesh, machine, tokens_per_step, inputs, trace.notes)


# --- traces --------------------------------------------------------------------------------------
@dataclass
class Generated:
    """What :func:`generate` wrote: the output folder and its manifest."""

    out: Path
    manifest: dict[str, Any]
    #: The simulated step when a system was given (the same as :func:`simulate` returns).
    sim: SimRun | None = None

    @property
    def peak_memory_bytes(self) -> int | None:
        """Peak memory of the busiest rank in the simulated step (None without a system)."""
        return None if self.sim is None else self.sim.result.peak_memory_bytes

    @property
    def world(self) -> int:
        return int(self.manifest["world"])

    @property
    def files(self) -> int:
        return int(self.manifest["files"]["count"])

    @property
    def bytes(self) -> int:
        return int(self.manifest["files"]["bytes"])


def generation_inputs(model: str, lowered: Lowered) -> dict[str, Any]:
    """What a trace was generated from (recorded verbatim in the manifest)."""
    plan = lowered.plan
    return {"source": "model", "model": model, "model_name": lowered.spec.name, "dtype": plan.dtype,
            "tokens_per_step": lowered.tokens_per_step, "plan": plan.summary()}


def generate(model: str | ModelSpec, plan: ParallelPlan = DEFAULT_PLAN, out: str | Path = "traces", *,
             prefix: str = "trace", workers: int = 1, classes_only: bool = False, json_traces: bool = True,
             progress: bool = False, force: bool = False,
             on_estimate: Callable[[int, int, int], None] | None = None,
             system: str | Path | SystemSpec | None = None) -> Generated:
    """Lower ``model`` under ``plan`` and write its Chakra ET traces into ``out`` (atomically).

    Before writing, ``on_estimate(files, bytes, free_bytes)`` gets the estimated output size; an
    output larger than the free space is refused (:class:`SpecError`) unless ``force``. With a
    ``system`` the step is also simulated (exactly as :func:`simulate`: the same peak memory), the
    system is recorded in the manifest, so ``simulate --trace`` needs no ``--system``, and every COMP
    node gets its ``duration_micros`` from the simulator's compute model (ASTRA-sim's replay mode)."""
    from tensorstage.fileio import require_replaceable_dir, require_writable_dir
    from tensorstage.trace import write_chakra

    require_replaceable_dir(out)  # before the lowering, not after it
    require_writable_dir(out)
    if system is not None:
        load_system(system, plan.world)  # a bad system: fail before any work
    lowered = lower(model, plan)
    sim = simulate(model, system, plan) if system is not None else None
    inputs = generation_inputs(_name(model), lowered)
    durations = info = None
    if system is not None:
        from tensorstage.sim import machine_from_system
        from tensorstage.sim.durations import duration_micros_fn

        inputs["system"] = _name(system)
        spec = load_system(system, plan.world)
        durations = duration_micros_fn(lowered.programs, machine_from_system(spec, plan.dtype).compute)
        info = {"source": "tensorstage compute model (sim.machine.machine_from_system(...).compute.time_s)",
                "system": spec.name, "device": spec.device.name, "dtype": plan.dtype,
                "rounding": "running total per rank class rounded to whole microseconds (sim/durations.py)"}
    manifest = write_chakra(lowered.programs, lowered.mesh, Path(out), prefix=prefix, workers=workers,
                            classes_only=classes_only, json=json_traces, progress=progress,
                            inputs=inputs, force=force, on_estimate=on_estimate, duration_micros=durations,
                            durations_info=info)
    return Generated(Path(out), manifest, sim)


# --- the main job --------------------------------------------------------------------------------
@dataclass
class RunOutput:
    """What :func:`run` wrote: the output folder, its report and the ``result.json`` document."""

    out: Path
    report: Path
    data: dict[str, Any]
    sim: SimRun


def run(model: str = DEFAULT_MODEL, system: str = DEFAULT_SYSTEM, plan: ParallelPlan = DEFAULT_PLAN,
        out: str | Path = "tensorstage-out", *, traces: str = "auto", workers: int = 1,
        notes: list[str] | None = None) -> RunOutput:
    """Lower, write traces, simulate, write result/timeline/report into ``out`` (atomically).

    ``notes`` (e.g. :attr:`PlanChoice.notes`) are recorded in ``result.json``."""
    from tensorstage.fileio import atomic_dir, require_replaceable_dir, require_writable_dir
    from tensorstage.report.simreport import write_json, write_report_files
    from tensorstage.sim.timeline import write_chrome_trace
    from tensorstage.trace import write_chakra

    out = Path(out)
    if traces not in TRACE_MODES:
        raise SpecError("traces", f"unknown trace mode {traces!r}", TRACE_MODES)
    require_replaceable_dir(out)  # fail before the work, not after it
    require_writable_dir(out)
    load_system(system, plan.world)  # bad system: fail before lowering
    lowered = lower(model, plan, fuse=True)
    sim = simulate_lowered(lowered, model, system)
    sim.notes[:0] = list(notes or [])
    data = sim.data()
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
        write_chrome_trace(sim.execution, tmp / "timeline.json", max_events=TIMELINE_MAX_EVENTS)
        write_report_files(tmp, data, sim.execution, sim.title())
    return RunOutput(out, out / "report.md", data, sim)


# --- serving -------------------------------------------------------------------------------------
@dataclass
class Served:
    """A serving simulation: the full result and the summary ``tensorstage serve --json`` prints."""

    result: ServingResult
    summary: dict[str, Any]


def serve(model: str | ModelSpec, system: str | Path | SystemSpec = DEFAULT_SYSTEM,
          workload: Workload | RequestTable | None = None, *, engine: str = "vllm", tp: int = 1,
          replicas: int = 1, weight_dtype: str = "bf16", kv_dtype: str | None = None,
          router: str = "round_robin", disagg: tuple[int, int] | None = None, decode_system: str | None = None,
          attention_dp: bool = False, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
          engine_overrides: Mapping[str, Any] | None = None,
          progress: Callable[[int], None] | None = None) -> Served:
    """Serve ``workload`` with ``replicas`` x TP ``tp`` replicas of ``engine`` (``tensorstage serve``).

    ``workload``: a :class:`tensorstage.serve.Workload` (offline, Poisson/Gamma, closed loop) or a
    :class:`tensorstage.serve.RequestTable` (e.g. from :func:`tensorstage.serve.traces.load_trace`);
    default: the CLI's default, 1,000 requests of 1,024 prompt and 256 output tokens at t = 0.
    ``engine_overrides``: profile fields to replace (``max_num_seqs``, ``max_num_batched_tokens``,
    ``block_tokens``, ``kv_mem_fraction``, ...; None values ignored). ``disagg``: (prefill, decode)
    replicas, which replaces ``replicas``. ``progress(k)`` is called as ``k`` more requests finish.
    """
    from tensorstage.serve import ServingPlan, load_profile
    from tensorstage.serve import Workload as _Workload
    from tensorstage.serve import simulate as _simulate

    for name, val in (("slo_ttft_ms", slo_ttft_ms), ("slo_tpot_ms", slo_tpot_ms)):
        if val is not None and not val > 0:
            raise SpecError(name, f"must be > 0, got {val}")
    spec = load_model(model)
    sysm = load_system(system)
    profile = load_profile(engine, **dict(engine_overrides or {}))
    plan = ServingPlan(engine=profile, tp=tp, replicas=replicas, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                       router=router, disagg=disagg, decode_system=decode_system, attention_dp=attention_dp).check()
    wl = workload if workload is not None else _Workload(1000, 1024, 256).check()
    ttft = None if slo_ttft_ms is None else slo_ttft_ms / 1e3
    tpot = None if slo_tpot_ms is None else slo_tpot_ms / 1e3
    result = _simulate(spec, sysm, plan, wl, ttft, tpot, progress=progress)
    from tensorstage.serve.workloads import workload_summary

    summary = {"model": spec.name, "system": _name(system), "engine": profile.name,
               "engine_overrides": {k: v for k, v in sorted((engine_overrides or {}).items()) if v is not None},
               "tp": tp,
               "replicas": plan.num_replicas(), "disagg": None if disagg is None else f"{disagg[0]}:{disagg[1]}",
               "num_gpus": result.num_gpus, "weight_dtype": weight_dtype, "kv_dtype": plan.kv_dtype,
               "router": router, "workload": workload_summary(wl),
               "kv_capacity_tokens": result.kv_capacity_tokens, **result.metrics.summary()}
    return Served(result, summary)


# --- validation ----------------------------------------------------------------------------------
@dataclass
class Validation:
    """Predicted vs measured for every selected case, and the summary document (``validate --json``)."""

    cases_path: Path
    results: list[CaseResult]
    skipped: list[tuple[str, str]]
    doc: dict[str, Any]

    @property
    def failed(self) -> bool:
        """True when some case could not be predicted (a bug, not an accuracy number)."""
        return any(r.predicted is None for r in self.results)


def validate(cases: str | Path | None = None, only: str | None = None,
             progress: Callable[[int, int, Target], None] | None = None) -> Validation:
    """Predict every published case of ``cases`` (default: the shared public cases file).

    ``only`` is a regular expression on case ids; ``progress(i, n, target)`` is called before
    each case (1-based ``i``)."""
    from tensorstage.validation.cases import default_cases_path, load_targets, select_ids
    from tensorstage.validation.run import report, run_targets

    path = Path(cases) if cases is not None else default_cases_path()
    targets, skipped = load_targets(path)
    targets = select_ids(targets, only, lambda t: t.id)
    done = [0]

    def tick(t: Target) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(targets), t)

    results = run_targets(targets, tick)
    return Validation(path, results, skipped, report(results, skipped))
