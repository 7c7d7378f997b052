"""Predicting each validation target and comparing it with the measurement.

Predictions go through the same path a user's command does: ``lower(spec, plan, options)`` then
the built-in simulator on the preset system. What is compared depends on the target's
``extract`` (see :class:`tensorstage.validation.cases.Target`):

* ``step_time_s``: the simulated step time.
* ``tflops_narayanan_full_recompute``: the source's FLOP convention applied to the *predicted*
  step time: ``96 B s L h^2 (1 + s/6h + V/16Lh) / (t n)`` (Narayanan et al. 2021, eq. 3; counts
  recompute), so the error is that of the step time seen through the source's formula.
* ``mfu_pct_narayanan``: ``72 B s L h^2 (1 + s/6h + V/12Lh) / (t n peak)`` (no recompute), the
  model-FLOPs convention of Korthikanti et al. 2022.
* ``tflops_megatron`` / ``mfu_pct_megatron``: Megatron-Core's ``num_floating_point_operations``
  as of the run's release (r0.8: ``12 B s L h^2 ((1 + g/n + s/h) q + f/h + V/2Lh)``: GEMMs x3 for
  forward + both backward GEMMs, attention *not* halved for the causal mask, no recompute) applied
  to the predicted step time, per GPU (and over the dense bf16 peak for MFU).
* ``layer_<forward|backward|combined>_ms``: the simulated time window of one transformer layer
  (layer 0 of a two-layer model): forward = its nodes up to its first recompute/backward node,
  backward = from there on (TP collectives included, optimizer excluded).
* ``layer_state_GiB``: parameters + gradients + optimizer states of the first pipeline stage's
  transformer layers: local weight elements from the block lowering x layers per stage x bytes
  per parameter of the graph's precision policy (Megatron: 2 + 4 + 4 + 8 = 18).
* ``activation_GiB``: saved activation bytes of one layer per micro-batch from the block lowering
  x layers per model chunk x the most (micro-batch, chunk) pairs in flight on pipeline rank 0
  under the plan's schedule (counted from :func:`pipeline_order`, not from a closed form).
* ``activation_relative_pct``: the same, relative to the TP-only no-recompute setup.
* ``model_state_GB``: resident model state (weights, gradients, optimizer states) of the most
  loaded rank, from the lowered Programs' ``static_bytes``, in 1e9 bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from tensorstage.graph.graph import build_graph, state_bytes_per_param
from tensorstage.hardware.system import load_system
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.validation.cases import (
    GROUP_TRAINING,
    GROUPS,
    Setup,
    Target,
)

GiB = 2**30
_LAYER_CATEGORIES_BWD = frozenset({"recompute", "bwd_input", "bwd_weight"})


@dataclass
class CaseResult:
    """One compared number (the ``--json`` record)."""

    id: str
    case_id: str
    kind: str
    metric: str
    unit: str
    predicted: float | None
    measured: float
    error_pct: float | None
    groups: list[str]
    note: str = ""
    error: str = ""
    wall_s: float = 0.0  # wall-clock time to run the case: the one field that varies run to run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- source FLOP conventions ---------------------------------------------------------------------


def narayanan_flops_full_recompute(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021 eq. 3: FLOPs of one step with full recompute (4 forward-equivalents)."""
    return 96.0 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def narayanan_flops_no_recompute(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Model FLOPs of one step without recompute (Narayanan et al. 2021 appendix; Korthikanti MFU)."""
    return 72.0 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))


def megatron_core_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int, heads: int, kv_heads: int,
                        ffn: int, gated: bool, head_dim: int) -> float:
    """Megatron-Core r0.8 ``num_floating_point_operations`` for a dense GPT (one step, no recompute)."""
    q_ratio = heads * head_dim / hidden
    attn = (1 + kv_heads / heads + seq / hidden) * q_ratio
    mlp = ffn / hidden * (1.5 if gated else 1.0)
    return 12.0 * batch * seq * layers * hidden**2 * (attn + mlp + vocab / (2 * layers * hidden))


# --- predictions ---------------------------------------------------------------------------------


class Predictor:
    """Runs lowering + simulation once per distinct :class:`Setup` and extracts target values.

    ``system_transform`` (optional) maps each case's preset system to the one simulated: a what-if
    (e.g. half the scale-out bandwidth) through the same path; the tests use it to prove that the
    accuracy assertions see a physical change real hardware would show.
    """

    def __init__(self, system_transform: Callable[[Any], Any] | None = None) -> None:
        self._transform = system_transform
        self._sim: dict[tuple, Any] = {}
        self._lowered: dict[tuple, Any] = {}
        self._blocks: dict[tuple, Any] = {}

    # --- shared work ---
    def lowered(self, setup: Setup) -> Any:
        key = setup.key()
        if key not in self._lowered:
            from tensorstage.lower import lower

            self._lowered[key] = lower(setup.spec, setup.plan, setup.options)
        return self._lowered[key]

    def preset_peak_flops(self, setup: Setup) -> float:
        """The dense datasheet peak of the case's preset device (the sources' MFU denominator)."""
        return load_system(setup.system, setup.num_gpus).device.peak_flops(setup.plan.dtype)

    def system(self, setup: Setup) -> Any:
        system = load_system(setup.system, setup.num_gpus)
        return system if self._transform is None else self._transform(system)

    def simulated(self, setup: Setup) -> Any:
        """The simulated step: extrapolated from three short steps when that is exact (the same
        checked steady-state extrapolation ``tensorstage simulate`` uses), else simulated in full;
        compute runs between communications fused (same time, fewer nodes)."""
        key = setup.key()
        if key not in self._sim:
            self._sim[key] = self._steady(setup) or self._simulate(setup, setup.plan)
        return self._sim[key]

    def _simulate(self, setup: Setup, plan: ParallelPlan) -> Any:
        from tensorstage.gcpause import paused_gc
        from tensorstage.lower import lower
        from tensorstage.sim import simulate

        with paused_gc():  # one pause over lower + simulate: no collector pass walks the live nodes between them
            low = lower(setup.spec, plan, setup.options, fuse=True)
            return simulate(low.programs, low.mesh, self.system(setup), dtype=plan.dtype,
                            tokens_per_step=low.tokens_per_step)

    def _steady(self, setup: Setup) -> Any:
        from tensorstage.sim.steady import simulate_steady

        got = simulate_steady(setup.plan, lambda p: self._simulate(setup, p), lambda r: r)
        return None if got is None else got[0]

    def block(self, setup: Setup, name: str = "dense") -> Any:
        """The block lowering of one layer kind (per rank, one micro-batch)."""
        key = setup.key()
        if key not in self._blocks:
            from tensorstage.lower import graph_options
            from tensorstage.lower.blocks import lower_blocks

            setup.plan.validate_for(setup.spec)
            opts = graph_options(setup.plan, setup.options)
            graph = build_graph(setup.spec, opts.phase, opts)
            self._blocks[key] = (lower_blocks(graph, setup.plan), opts)
        blocks, opts = self._blocks[key]
        return blocks[name], opts

    # --- extractions ---
    def predict(self, target: Target) -> float:
        fn: Callable[[Target], float] = getattr(self, f"_x_{target.extract}")
        return fn(target)

    def _x_step_time_s(self, t: Target) -> float:
        return float(self.simulated(t.setup).step_time_s)

    def _flops_args(self, t: Target) -> tuple[int, int, int, int, int]:
        s, p = t.setup.spec, t.setup.plan
        return p.global_batch, p.seq, s.num_layers, s.hidden, s.vocab

    def _x_tflops_narayanan_full_recompute(self, t: Target) -> float:
        step = self._x_step_time_s(t)
        return narayanan_flops_full_recompute(*self._flops_args(t)) / (step * t.setup.num_gpus) / 1e12

    def _x_mfu_pct_narayanan(self, t: Target) -> float:
        step = self._x_step_time_s(t)
        peak = self.preset_peak_flops(t.setup)
        return 100.0 * narayanan_flops_no_recompute(*self._flops_args(t)) / (step * t.setup.num_gpus * peak)

    def _megatron_flops(self, t: Target) -> float:
        s, p = t.setup.spec, t.setup.plan
        return megatron_core_flops(p.global_batch, p.seq, s.num_layers, s.hidden, s.vocab, s.num_heads,
                                   s.num_kv_heads or s.num_heads, s.ffn, s.activation in ("swiglu", "geglu"),
                                   s.head_dim or s.hidden // s.num_heads)

    def _x_tflops_megatron(self, t: Target) -> float:
        return self._megatron_flops(t) / (self._x_step_time_s(t) * t.setup.num_gpus) / 1e12

    def _x_mfu_pct_megatron(self, t: Target) -> float:
        peak = self.preset_peak_flops(t.setup)
        return 100.0 * self._megatron_flops(t) / (self._x_step_time_s(t) * t.setup.num_gpus * peak)

    def layer_window_s(self, setup: Setup) -> tuple[float, float]:
        """(forward, backward) seconds of layer 0 in the simulated timeline."""
        key = ("layer", setup.key())
        if key not in self._sim:
            from tensorstage.sim.engine import execute
            from tensorstage.sim.machine import machine_from_system

            low = self.lowered(setup)
            ex = execute(low.programs, low.mesh, machine_from_system(self.system(setup), setup.plan.dtype))
            prog = low.programs[0]
            base = ex.offsets[0]
            nodes = [n for n in prog.nodes if n.layer == 0 and n.category != "optimizer"]
            split = next((n.id for n in nodes if n.category in _LAYER_CATEGORIES_BWD), None)
            if split is None:
                raise RuntimeError("layer 0 has no backward nodes")
            fwd = [n.id for n in nodes if n.id < split]
            bwd = [n.id for n in nodes if n.id >= split]

            def window(ids: list[int]) -> float:
                return max(ex.end[base + i] for i in ids) - min(ex.start[base + i] for i in ids)

            self._sim[key] = (window(fwd), window(bwd))
        return self._sim[key]

    def _x_layer_forward_ms(self, t: Target) -> float:
        return 1e3 * self.layer_window_s(t.setup)[0]

    def _x_layer_backward_ms(self, t: Target) -> float:
        return 1e3 * self.layer_window_s(t.setup)[1]

    def _x_layer_combined_ms(self, t: Target) -> float:
        return 1e3 * sum(self.layer_window_s(t.setup))

    def _x_layer_state_GiB(self, t: Target) -> float:
        blk, opts = self.block(t.setup)
        per_param = sum(state_bytes_per_param(opts).values())
        p = t.setup.plan
        layers_per_rank = t.setup.spec.num_layers // p.pp
        return sum(w.numel for w in blk.weights) * layers_per_rank * per_param / GiB

    def activation_bytes(self, setup: Setup) -> float:
        from tensorstage.schedule.pipeline import pipeline_order

        blk, _ = self.block(setup)
        p = setup.plan
        layers_per_chunk = setup.spec.num_layers // (p.pp * p.vpp)
        return blk.saved_bytes * layers_per_chunk * in_flight(pipeline_order(p.schedule, p.pp, p.microbatches,
                                                                             p.vpp)[0])

    def _x_activation_GiB(self, t: Target) -> float:
        return self.activation_bytes(t.setup) / GiB

    def _x_activation_relative_pct(self, t: Target) -> float:
        return 100.0 * self.activation_bytes(t.setup) / self.activation_bytes(t.args["base"])

    def _x_model_state_GB(self, t: Target) -> float:
        low = self.lowered(t.setup)
        keys = ("weights", "gradients", "optimizer_states", "master_weights")
        return max(sum(v for k, v in p.static_bytes.items() if any(k.startswith(x) for x in keys))
                   for p in low.programs) / 1e9


def in_flight(actions: Iterable[Any]) -> int:
    """Most (micro-batch, chunk) forwards whose backward has not run yet, along one rank's order."""
    live: set[tuple[int, int]] = set()
    peak = 0
    for a in actions:
        kind = str(getattr(a.kind, "value", a.kind))
        if kind == "F":
            live.add((a.microbatch, a.chunk))
            peak = max(peak, len(live))
        elif kind in ("B", "I"):
            live.discard((a.microbatch, a.chunk))
    return peak


# --- running and summarising --------------------------------------------------------------------


def run_targets(targets: list[Target], progress: Callable[[Target], None] | None = None,
                system_transform: Callable[[Any], Any] | None = None) -> list[CaseResult]:
    """Predict every target; a target whose prediction fails records the error instead.

    ``system_transform``: see :class:`Predictor`."""
    pred = Predictor(system_transform)
    out = []
    for t in targets:
        if progress is not None:
            progress(t)
        t0 = time.perf_counter()
        value: float | None = None
        error = ""
        try:
            value = float(pred.predict(t))
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others' numbers
            error = f"{type(exc).__name__}: {exc}"
        err = None if value is None else 100.0 * (value - t.measured) / t.measured
        out.append(CaseResult(t.id, t.case_id, t.kind, t.metric, t.unit, value, t.measured, err,
                              list(t.groups), t.note, error, time.perf_counter() - t0))
    return out


def group_summary(results: list[CaseResult]) -> dict[str, dict[str, Any]]:
    """MAPE, max |error| and counts per group (failed predictions counted apart, not in the MAPE)."""
    out: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        rs = [r for r in results if g in r.groups]
        if not rs:
            continue
        errs = [abs(r.error_pct) for r in rs if r.error_pct is not None]
        out[g] = {
            "n": len(rs),
            "failed": len(rs) - len(errs),
            "mape_pct": sum(errs) / len(errs) if errs else None,
            "max_abs_error_pct": max(errs) if errs else None,
        }
    return out


def report(results: list[CaseResult], skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """The ``--json`` document: cases, overall ``mape_pct`` (all training cases), groups, skipped."""
    groups = group_summary(results)
    return {
        "cases": [r.to_dict() for r in results],
        "mape_pct": groups.get(GROUP_TRAINING, {}).get("mape_pct"),
        "groups": groups,
        "skipped": [{"case_id": c, "reason": why} for c, why in skipped],
    }
