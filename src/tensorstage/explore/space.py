"""Design spaces: parameters grouped by stack, derived values, constraints, objectives, a budget.

After COSMIC's parameter-set idea: one file says which knobs of the workload, collective,
network and hardware stacks may move, how they relate and what is optimised, so one search can
co-optimise them instead of tuning one stack at a time.

Every parameter has a *finite* domain (a float range is sampled on ``steps`` points, linear or
log), so every agent works on the same integer index vectors and a study can tell whether a
configuration was already evaluated. Stacks and the names they accept:

* ``plan``: any :class:`~tensorstage.parallel.plan.ParallelPlan` field (tp, pp, dp, cp, ep, vpp,
  zero, recompute, schedule, micro_batch, sp, ...).
* ``collective``: the plan fields that shape collectives (:data:`COLLECTIVE_FIELDS`).
* ``network``: ``<dimension>.<bandwidth_GBps|latency_ns|topology|npus>`` of the system's network
  dimensions (``nvlink.bandwidth_GBps``); the scale-up dimension's ``npus`` is the node size, the
  outermost scale-out dimension's is resized to the GPU count (the inner ones' are free).
* ``hardware``: ``device`` (a device preset name).
* ``serving``: reserved for the serving simulator (rejected until it exists).

Parameter forms: ``{choice: [..]}`` (or a bare list), ``{int: [lo, hi], step: k}``, ``{pow2: [lo, hi]}``,
``{float: [lo, hi], steps: n, log: false}``. ``derived`` maps names to expressions, ``constraints``
is a list of boolean expressions (:mod:`.expr`); names visible to expressions are the parameters,
derived values, ``gpus``, the ``fixed`` plan values (other plan fields: their defaults), ``model.<field>`` and ``system.gpus_per_node``;
a constraint naming a result metric (``peak_memory_bytes <= hbm_bytes``) is checked after
evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.explore.expr import Expr, compile_expr, scalar
from tensorstage.fileio import read_yaml_file
from tensorstage.parallel.plan import ParallelPlan

STACKS = ("plan", "collective", "network", "hardware", "serving")
#: the stacks a space can search in this version (``serving`` is named, and refused with its reason)
SEARCHABLE_STACKS = tuple(s for s in STACKS if s != "serving")
COLLECTIVE_FIELDS = ("dp_bucket_bytes", "overlap_grad_reduce", "overlap_param_gather", "cp_mode", "ddp_style",
                     "zero_shard_size", "fsdp_prefetch")
NETWORK_ATTRS = ("bandwidth_GBps", "latency_ns", "npus", "topology")
HARDWARE_FIELDS = ("device",)
#: Result metrics an objective or a post-evaluation constraint may name (see :mod:`.evaluate`).
METRICS = ("step_time_s", "mfu", "tokens_per_s", "tokens_per_s_per_gpu", "peak_memory_bytes", "hbm_bytes",
           "memory_fraction", "gpu_s_per_token")
GOALS = ("min", "max")
KINDS = ("choice", "int", "pow2", "float")
MODEL_FIELDS = ("num_layers", "hidden", "num_heads", "kv_heads", "ffn", "vocab", "num_experts")
#: Plan fields left out of a space take the plan's defaults, and expressions see them too.
_PLAN_DEFAULTS: dict[str, Any] = {k: f.default for k, f in ParallelPlan.model_fields.items()
                                  if isinstance(f.default, int | float | str | bool)}
#: A grid larger than this is not enumerated (a vectorised pass over it would not fit in memory).
MAX_ENUMERATE = 20_000_000


@dataclass(frozen=True)
class Parameter:
    """One searchable knob: its stack, name, kind and the finite list of values it takes."""

    stack: str
    name: str
    kind: str
    values: tuple[Any, ...]

    @property
    def ordered(self) -> bool:
        """Whether neighbouring indices are neighbouring values (everything but ``choice``)."""
        return self.kind != "choice"

    @property
    def size(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Objective:
    """A metric (or an expression over metrics) to minimise or maximise."""

    name: str
    goal: str
    expr: Expr

    def sign(self) -> float:
        """+1 for minimise, -1 for maximise: agents always minimise ``sign * value``."""
        return 1.0 if self.goal == "min" else -1.0


@dataclass
class Space:
    """A parsed space file (see module docstring)."""

    name: str
    model: str
    system: str
    gpus: int
    fixed: dict[str, Any]
    parameters: list[Parameter]
    derived: dict[str, Expr] = field(default_factory=dict)
    constraints: list[Expr] = field(default_factory=list)
    objectives: list[Objective] = field(default_factory=list)
    budget: int = 100
    evaluator: str = "screened"
    constants: dict[str, Any] = field(default_factory=dict)

    # --- structure --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def sizes(self) -> list[int]:
        return [p.size for p in self.parameters]

    @property
    def grid_size(self) -> int:
        return int(np.prod(self.sizes, dtype=np.float64)) if self.parameters else 1

    def pre_constraints(self) -> list[Expr]:
        """Constraints over parameters only (checked before any evaluation)."""
        return [c for c in self.constraints if not (c.names & set(METRICS))]

    def post_constraints(self) -> list[Expr]:
        """Constraints that read a result metric (checked on the evaluator's metrics)."""
        return [c for c in self.constraints if c.names & set(METRICS)]

    # --- candidates -------------------------------------------------------------------------
    def decode(self, index: tuple[int, ...]) -> dict[str, Any]:
        """Parameter values of an index vector, plus derived values."""
        cfg = {p.name: p.values[i] for p, i in zip(self.parameters, index, strict=True)}
        env = self.env(cfg)
        for name, ex in self.derived.items():
            env[name] = cfg[name] = scalar(ex(env))
        return cfg

    def env(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The names an expression sees for one candidate (or arrays of candidates)."""
        return {**_PLAN_DEFAULTS, **self.constants, **self.fixed, "gpus": self.gpus, **cfg}

    def feasible(self, cfg: Mapping[str, Any]) -> tuple[bool, str]:
        """Whether the pre-evaluation constraints hold; else the first failing one's text."""
        env = self.env(cfg)
        for c in self.pre_constraints():
            if not bool(c(env)):
                return False, c.text
        return True, ""

    def enumerate_indices(self) -> np.ndarray:
        """Every index vector of the grid, shape ``(grid_size, n_params)`` (int32), row-major."""
        if self.grid_size > MAX_ENUMERATE:
            raise SpecError("parameters", f"{self.grid_size:,} configurations exceed the {MAX_ENUMERATE:,} "
                            "that can be enumerated; narrow the ranges or use a sampling agent")
        if not self.parameters:
            return np.zeros((1, 0), dtype=np.int32)
        grids = np.indices(self.sizes, dtype=np.int32)
        return grids.reshape(len(self.sizes), -1).T.copy()

    def columns(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Values (and derived values) of many index vectors as one numpy array per name."""
        cols: dict[str, np.ndarray] = {}
        for j, p in enumerate(self.parameters):
            vals = np.asarray(p.values, dtype=object if p.kind == "choice" else None)
            cols[p.name] = vals[index[:, j]]
        env = self.env(cols)
        for name, ex in self.derived.items():
            env[name] = cols[name] = np.broadcast_to(np.asarray(ex(env)), (len(index),))
        return cols

    def feasible_mask(self, index: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Vectorised :meth:`feasible` over index rows, and the columns it evaluated."""
        cols = self.columns(index)
        env = self.env(cols)
        mask = np.ones(len(index), dtype=bool)
        for c in self.pre_constraints():
            mask &= np.broadcast_to(np.asarray(c(env), dtype=bool), mask.shape)
        return mask, cols

    def iter_grid(self) -> Iterator[tuple[int, ...]]:
        """Every index vector, lazily (for grids too large to enumerate as one array)."""
        return itertools.product(*(range(n) for n in self.sizes))


# --- parsing -------------------------------------------------------------------------------------


def _parameter(stack: str, name: str, raw: Any, where: str) -> Parameter:
    if isinstance(raw, list):
        raw = {"choice": raw}
    if not isinstance(raw, dict):
        return Parameter(stack, name, "choice", (raw,))
    kinds = [k for k in KINDS if k in raw]
    if len(kinds) != 1:
        raise SpecError(where, "give exactly one of choice, int, pow2, float", KINDS)
    kind = kinds[0]
    extra = sorted(set(raw) - {kind, "step", "steps", "log"})
    if extra:
        raise SpecError(f"{where}.{extra[0]}", "unknown key", (kind, "step", "steps", "log"))
    spec = raw[kind]
    if kind == "choice":
        if not isinstance(spec, list) or not spec:
            raise SpecError(where, "choice needs a non-empty list of values")
        if len({repr(v) for v in spec}) != len(spec):
            raise SpecError(where, f"choice has repeated values: {spec}")
        return Parameter(stack, name, kind, tuple(spec))
    if (not isinstance(spec, list) or len(spec) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec)):
        raise SpecError(where, f"{kind} needs [low, high] numbers, got {spec!r}")
    lo, hi = spec
    if lo > hi:
        raise SpecError(where, f"low {lo} > high {hi}")
    if kind == "int":
        step = raw.get("step", 1)
        if not isinstance(lo, int) or not isinstance(hi, int) or not isinstance(step, int) or step < 1:
            raise SpecError(where, f"int needs integer low, high and step >= 1, got {spec} step {step}")
        return Parameter(stack, name, kind, tuple(range(lo, hi + 1, step)))
    if kind == "pow2":
        if not all(isinstance(v, int) and v >= 1 and v & (v - 1) == 0 for v in spec):
            raise SpecError(where, f"pow2 needs powers of two >= 1, got {spec}")
        return Parameter(stack, name, kind, tuple(2**k for k in range(lo.bit_length() - 1, hi.bit_length())))
    steps = raw.get("steps", 5)
    if not isinstance(steps, int) or steps < 1:
        raise SpecError(f"{where}.steps", f"must be an integer >= 1, got {steps!r}")
    log = raw.get("log", False)
    if log and lo <= 0:
        raise SpecError(where, "a log range needs low > 0")
    pts = np.geomspace(lo, hi, steps) if log else np.linspace(lo, hi, steps)
    return Parameter(stack, name, kind, tuple(float(round(v, 9)) for v in pts))


def _check_name(stack: str, name: str, where: str, network_dims: list[str]) -> None:
    if stack == "plan" and name not in ParallelPlan.model_fields:
        raise SpecError(where, "not a plan field", sorted(ParallelPlan.model_fields))
    if stack == "collective" and name not in COLLECTIVE_FIELDS:
        raise SpecError(where, "not a collective knob", COLLECTIVE_FIELDS)
    if stack == "network":
        dim, _, attr = name.partition(".")
        if dim not in network_dims or attr not in NETWORK_ATTRS:
            raise SpecError(where, "network parameters are <dimension>.<attribute>",
                            [f"{d}.{a}" for d in network_dims for a in NETWORK_ATTRS])
    if stack == "hardware" and name not in HARDWARE_FIELDS:
        raise SpecError(where, "not a hardware knob", HARDWARE_FIELDS)
    if stack == "serving":
        raise SpecError(where, "serving parameters need the serving evaluator, which this version lacks")


def _check_values(param: Parameter, where: str, system: str, gpus: int) -> None:
    """Every value of ``param`` must be legal on its own, so that a typo (``recompute: [none, ful]``,
    ``device: [H100-SMX]``, a negative bandwidth) is one line here, not an infeasible trial per
    candidate that spends the budget: plan and collective knobs as their plan field, a network value
    as a field of its dimension alone (whether an ``npus`` fits the GPU count depends on the other
    dimensions' values: that stays a per-candidate check), a device by loading it."""
    from pydantic import ValidationError

    from tensorstage.hardware import load_device, load_system
    from tensorstage.hardware.system import NetworkDim

    for v in param.values:
        if param.stack in ("plan", "collective") and param.name in ParallelPlan.model_fields:
            ParallelPlan.check_field(param.name, v, where.rpartition(".")[0])
        elif param.stack == "network":
            dim_name, _, attr = param.name.partition(".")
            dim = next(d for d in load_system(system).network if d.name == dim_name)
            try:
                NetworkDim.model_validate({**dim.model_dump(), attr: v})
            except ValidationError as exc:
                err = exc.errors()[0]
                msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
                raise SpecError(where, f"value {v!r}: {msg}") from None
        elif param.stack == "hardware":
            load_device(str(v), field=where)


def model_constants(model: str) -> dict[str, Any]:
    """``model.<field>`` names for expressions (resolving the model checks its name too)."""
    from tensorstage.model import resolve_model

    spec = resolve_model(model)
    return {"model.num_layers": spec.num_layers, "model.hidden": spec.hidden, "model.num_heads": spec.num_heads,
            "model.kv_heads": spec.kv_heads, "model.ffn": spec.ffn, "model.vocab": spec.vocab,
            "model.num_experts": spec.moe.num_experts if spec.moe else 1}


def parse_space(data: Any, where: str = "space", base: Path | None = None) -> Space:
    """Validate a space mapping (the parsed YAML) into a :class:`Space`; problems are one-line ``SpecError``s.
    A relative model or system YAML path is taken relative to ``base`` (the space file's folder)."""
    from tensorstage.hardware import load_system
    from tensorstage.hardware.presets import looks_like_path

    if not isinstance(data, dict):
        raise SpecError(where, "a space file is a mapping (model, system, gpus, parameters, ...)")
    known = {"name", "model", "system", "gpus", "fixed", "parameters", "derived", "constraints", "objectives",
             "budget", "evaluator"}
    extra = sorted(set(data) - known)
    if extra:
        raise SpecError(f"{where}.{extra[0]}", "unknown key", sorted(known))
    for key in ("model", "system", "gpus"):
        if key not in data:
            raise SpecError(f"{where}.{key}", "required")
    gpus = data["gpus"]
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise SpecError(f"{where}.gpus", f"must be a positive integer, got {gpus!r}")
    for key in ("model", "system"):  # a file named in the space is found beside it, wherever the command runs
        text = str(data[key])
        is_file = looks_like_path(text) or text.endswith(".json")  # a model may be an HF config.json
        if base is not None and is_file and not Path(text).is_absolute():
            data = {**data, key: str((base / text).resolve())}
    consts = model_constants(str(data["model"]))
    system = load_system(str(data["system"]), gpus)
    consts["system.gpus_per_node"] = system.gpus_per_node
    dims = [d.name for d in system.network]
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SpecError(f"{where}.fixed", "must be a mapping of plan keys to values")
    for k in fixed:
        if k not in ParallelPlan.model_fields:
            raise SpecError(f"{where}.fixed.{k}", "not a plan field", sorted(ParallelPlan.model_fields))
    # each value checked (and coerced: "false" -> False) as its field alone, so a bad one is one line
    # here rather than every candidate failing later
    fixed = {k: ParallelPlan.check_field(k, v, f"{where}.fixed") for k, v in fixed.items()}
    params: list[Parameter] = []
    groups = data.get("parameters") or {}
    if not isinstance(groups, dict):
        raise SpecError(f"{where}.parameters", "must map stacks to parameters", STACKS)
    seen: set[str] = set()
    for stack, entries in groups.items():
        if stack not in STACKS:
            raise SpecError(f"{where}.parameters.{stack}", "unknown stack", SEARCHABLE_STACKS)
        if not isinstance(entries, dict):
            raise SpecError(f"{where}.parameters.{stack}", "must map parameter names to ranges")
        for name, raw in entries.items():
            pw = f"{where}.parameters.{stack}.{name}"
            _check_name(stack, str(name), pw, dims)
            if name in seen or name in fixed:
                raise SpecError(pw, "given twice (in another stack or in fixed)")
            seen.add(str(name))
            params.append(_parameter(stack, str(name), raw, pw))
            _check_values(params[-1], pw, str(data["system"]), gpus)
            _check_dense(str(name), params[-1].values, pw, consts, str(data["model"]))
    derived = {}
    for name, text in (data.get("derived") or {}).items():
        if name in seen or name in fixed:
            raise SpecError(f"{where}.derived.{name}", "already a parameter or fixed value")
        ex = compile_expr(text, f"{where}.derived.{name}")
        if name in ex.names:  # it would read the plan default of its own name (dp = 1), silently
            raise SpecError(f"{where}.derived.{name}", f"refers to itself: {ex.text}")
        derived[str(name)] = ex
    for name in ("ep", "etp"):
        if name in fixed:
            _check_dense(name, (fixed[name],), f"{where}.fixed.{name}", consts, str(data["model"]))
    for name, what in (("global_batch", "sequences per step"), ("seq", "tokens per sequence")):
        # a training step's work: a plan default (16 sequences of 4,096) would be a silent guess
        if name not in fixed and name not in seen and name not in derived:
            raise SpecError(f"{where}.fixed.{name}", f"required: the {what} (give it in fixed, parameters or "
                            "derived)")
    constraints = [compile_expr(t, f"{where}.constraints[{i}]") for i, t in enumerate(data.get("constraints") or [])]
    raw_objectives = data.get("objectives")  # not given: minimise the step time; given empty: an error
    objectives = _objectives([{"metric": "step_time_s", "goal": "min"}] if raw_objectives is None else raw_objectives,
                             where)
    budget = data.get("budget", 100)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise SpecError(f"{where}.budget", f"must be a positive integer, got {budget!r}")
    evaluator = data.get("evaluator", "screened")
    if evaluator not in ("full", "fast", "screened"):
        raise SpecError(f"{where}.evaluator", f"unknown evaluator {evaluator!r}", ("full", "fast", "screened"))
    space = Space(str(data.get("name") or data["model"]), str(data["model"]), str(data["system"]), gpus,
                  dict(fixed), params, derived, constraints, objectives, budget, evaluator, consts)
    _check_names(space, where)
    return space


def _check_dense(name: str, values: Any, where: str, consts: Mapping[str, Any], model: str) -> None:
    """Expert parallelism (``ep`` / ``etp`` other than 1) on a model without routed experts is a
    mistake to name, not a filter that spends the budget on infeasible trials."""
    if name in ("ep", "etp") and consts["model.num_experts"] == 1 and any(v not in (None, 1) for v in values):
        raise SpecError(where, f"expert parallelism applies only to MoE models; {model} has no experts", (1,))


def _objectives(raw: Any, where: str) -> list[Objective]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{where}.objectives", "must be a non-empty list of {metric|expr, goal}")
    out = []
    for i, o in enumerate(raw):
        w = f"{where}.objectives[{i}]"
        if not isinstance(o, dict) or ("metric" in o) == ("expr" in o):
            raise SpecError(w, "give metric or expr (and goal)", METRICS)
        goal = o.get("goal", "min")
        if goal not in GOALS:
            raise SpecError(f"{w}.goal", f"unknown goal {goal!r}", GOALS)
        if "metric" in o and o["metric"] not in METRICS:
            raise SpecError(f"{w}.metric", f"unknown metric {o['metric']!r}", METRICS)
        text = o.get("metric") or o["expr"]
        name = str(o.get("name") or text)
        if name in {x.name for x in out}:
            raise SpecError(w, f"objective {name!r} is given twice (a name must be unique)")
        out.append(Objective(name, goal, compile_expr(text, w)))
    return out


def _check_names(space: Space, where: str) -> None:
    """Every name an expression reads must exist (a typo fails at load, not mid-search)."""
    visible = set(_PLAN_DEFAULTS) | set(space.constants) | set(space.fixed) | {"gpus"} | set(space.names)
    for name, ex in space.derived.items():
        missing = sorted(ex.names - visible)
        if missing:
            raise SpecError(f"{where}.derived.{name}", f"unknown name {missing[0]!r}", sorted(visible))
        visible.add(name)
    for i, c in enumerate(space.constraints):
        missing = sorted(c.names - visible - set(METRICS))
        if missing:
            raise SpecError(f"{where}.constraints[{i}]", f"unknown name {missing[0]!r}", sorted(visible | set(METRICS)))
    for i, o in enumerate(space.objectives):
        missing = sorted(o.expr.names - visible - set(METRICS))
        if missing:
            raise SpecError(f"{where}.objectives[{i}]", f"unknown name {missing[0]!r}", METRICS)


def load_space(path: str | Path) -> Space:
    """Read and check a space YAML file."""
    path = Path(path)
    data = read_yaml_file(path, "space file")
    return parse_space(data, where=path.name, base=path.parent)
