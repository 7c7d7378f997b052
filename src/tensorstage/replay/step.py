"""Replay one step of a plan (or a trace) on real processes, beside its simulation.

:func:`replay_programs` scales the Programs' communication (``--scale``), simulates the scaled
slice on the emulated links (the simulator's own engine and collective model, the system's
device for compute), turns it into per-rank op lists (:mod:`tensorstage.replay.program`), runs them
on one process per rank (gloo; emulated links or loopback) and pairs every measured operation
with its simulated node.

Measured time of an operation = ``max(end) - max(start)`` over the ranks that took part (from the
last arrival to the last completion); simulated = the node's ``end - start`` (transfer time; a
send/recv pair is charged to the send, which the simulator moves eagerly); beside both, the
alpha-beta model of the algorithm that ran on the same links
(:func:`tensorstage.replay.model.algorithm_time_s`: with ``collectives="p2p"``, the default, the
simulator's own algorithms on send/recv; with ``"native"`` gloo's, whose reduce-scatter is an
all-reduce of the input, twice the simulator's ring). Per class and
node, the measured time is the mean over the groups (or rank pairs) that ran it; the step's
communication per class is the sum over its nodes, by kind, measured beside simulated; the measured wall time of the whole replay and the simulated step time of the
same slice are reported too (the processes run each rank's ops one after another, the simulator
overlaps streams, so these differ by design; the per-operation sums are the like-for-like view).

The whole mesh is replayed, or a slice of it (``--slice dp=0``: the ranks with those coordinates,
e.g. one TP group per pipeline stage); ``--ranks`` must equal the number of ranks replayed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.replay.bench import choose_network
from tensorstage.replay.launch import Placement, run_ranks
from tensorstage.replay.microbench import BenchCase
from tensorstage.replay.model import Links, algorithm_time_s
from tensorstage.replay.netns import EmulatedNetwork
from tensorstage.replay.program import RankOps, rank_ops, scaled_programs, slice_ranks
from tensorstage.schedule.program import NodeKind, Program

_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


@dataclass
class StepReplay:
    """Everything one step replay produced."""

    programs: list[Program]
    mesh: Any
    links: Links
    network: str
    execution: Any  # tensorstage.sim.engine.Execution of the scaled slice
    rank_ops: RankOps
    results: list[dict]
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    collectives: str = "p2p"


def _bounds(ro: RankOps, max_bytes: int) -> None:
    per_rank = [sum(o.bytes for o in ops if o.kind != "wait") for ops in ro.ops]
    worst = max(per_rank, default=0)
    if worst > max_bytes:
        raise SpecError("scale", f"one rank would move {worst / 2**30:.2f} GiB, over the limit of "
                        f"{max_bytes / 2**30:.2f} GiB (lower --scale or raise --max-gib)")


def replay_programs(programs: list[Program], mesh: Any, links: Links, *, system: str, dtype: str = "bf16",
                    scale: float = 0.01, compute: str = "skip", network: str = "auto", timeout_s: float = 600.0,
                    max_bytes: int = 4 * 2**30, inputs: dict[str, Any] | None = None,
                    fixed: dict[str, int] | None = None, collectives: str = "p2p") -> StepReplay:
    """Simulate and run the scaled slice (module docstring); ``fixed``: axis coordinates that
    select the replayed ranks (:func:`tensorstage.replay.program.slice_ranks`), default all."""
    from tensorstage.hardware import load_system
    from tensorstage.sim import execute, machine_from_system

    if not 0 < scale <= 1:
        raise SpecError("scale", f"must be in (0, 1], got {scale}")
    members = slice_ranks(mesh, fixed or {})
    if links.ranks != len(members):
        raise SpecError("ranks", f"the slice has {len(members)} ranks; --ranks must equal it (got {links.ranks})")
    scaled = scaled_programs(programs, scale, compute)
    machine = machine_from_system(load_system(system, mesh.world), dtype)
    machine = replace(machine, fabric=links.fabric())
    ex = execute(scaled, mesh, machine, merge_chains=False)
    compute_s = {}
    if compute == "wait":
        for c, p in enumerate(scaled):
            for n in p.nodes:
                if n.kind == NodeKind.COMP:
                    g = ex.offsets[c] + n.id
                    compute_s[(c, n.id)] = ex.end[g] - ex.start[g]
    ro = rank_ops(scaled, mesh, compute, compute_s, members)
    _bounds(ro, max_bytes)
    sim_s = ex.step_time_s
    if sim_s > 0.8 * timeout_s:
        raise SpecError("timeout_s", f"the slice should take ~{sim_s:.0f} s on these links, too close to the limit "
                        f"of {timeout_s:g} s (lower --scale or raise --timeout-s)")
    mode, notes = choose_network(network)
    node = links.node_size if links.two_tier else None
    if mode == "netns":
        with EmulatedNetwork(links) as net:
            place = Placement(tuple(net.namespace(r) for r in range(links.ranks)), net.address(0), "eth0")
            results = run_ranks(ro.groups, ro.ops, place, timeout_s, collectives=collectives, node_size=node)
    else:
        results = run_ranks(ro.groups, ro.ops, Placement.loopback(links.ranks), timeout_s, collectives=collectives,
                            node_size=node)
    if ro.skipped:
        notes.append("left out (their group or peer is outside the slice), summed over ranks: "
                     + ", ".join(f"{v} {k}" for k, v in ro.skipped.items()))
    return StepReplay(scaled, mesh, links, mode, ex, ro, results, dict(inputs or {}), notes, collectives)


def replay_model(model: str, plan: Any, links_for: Any, **kw: Any) -> StepReplay:
    """Lower ``model`` under ``plan`` (fused compute runs, as ``simulate`` does) and replay it;
    ``links_for(world)`` gives the links for the plan's world size."""
    from tensorstage.lower import lower
    from tensorstage.model import resolve_model

    lowered = lower(resolve_model(model), plan, fuse=True)
    inputs = {"source": "model", "model": model, "plan": plan.summary(), **kw.pop("inputs", {})}
    members = slice_ranks(lowered.mesh, kw.get("fixed") or {})
    return replay_programs(lowered.programs, lowered.mesh, links_for(len(members)), dtype=plan.dtype,
                           inputs=inputs, **kw)


def replay_trace(directory: Any, links_for: Any, **kw: Any) -> StepReplay:
    """Replay a Chakra trace directory (ours, or one :mod:`tensorstage.trace.to_programs` reads)."""
    from pathlib import Path

    from tensorstage.trace.to_programs import programs_from_trace

    trace = programs_from_trace(directory)
    inputs = {"source": "trace", "trace": Path(directory).name, **kw.pop("inputs", {})}
    members = slice_ranks(trace.mesh, kw.get("fixed") or {})
    res = replay_programs(trace.programs, trace.mesh, links_for(len(members)), inputs=inputs, **kw)
    res.notes.extend(trace.notes)
    return res


def measured_nodes(res: StepReplay) -> list[dict[str, Any]]:
    """One entry per replayed communication node of a class: measured seconds (mean over the
    groups or pairs that ran it) and simulated seconds, with the node's name and kind."""
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    where: dict[str, tuple[str, int, int]] = {}
    case_of: dict[str, BenchCase] = {}
    for r, out in enumerate(res.results):
        for rec in out["records"]:
            if rec["kind"] == "wait":
                continue
            spans[rec["key"]].append((rec["start_ns"], rec["end_ns"]))
            c, nid = res.rank_ops.origin[r][rec["i"]]
            if rec["key"] not in where or rec["kind"] == "send":
                where[rec["key"]] = (rec["kind"], c, nid)
            if rec["key"] not in case_of:
                op = res.rank_ops.ops[r][rec["i"]]
                p2p = op.kind in ("send", "recv")
                ranks = tuple(sorted((r, op.peer))) if p2p else tuple(res.rank_ops.groups[op.group])
                case_of[rec["key"]] = BenchCase("send_recv" if p2p else op.kind, res.links.label(ranks, p2p), ranks,
                                                op.bytes)
    per_node: dict[tuple[int, int], list[float]] = defaultdict(list)
    algo: dict[tuple[int, int], list[float]] = defaultdict(list)
    kinds: dict[tuple[int, int], str] = {}
    for key, s in spans.items():
        kind, c, nid = where[key]
        per_node[(c, nid)].append((max(e for _, e in s) - max(b for b, _ in s)) * 1e-9)
        kinds[(c, nid)] = "send_recv" if kind in ("send", "recv") else kind
        algo[(c, nid)].append(algorithm_time_s(case_of[key], res.links, res.collectives))
    ex = res.execution
    out_nodes = []
    for (c, nid) in sorted(per_node):
        g = ex.offsets[c] + nid
        ts = per_node[(c, nid)]
        out_nodes.append({"class": c, "node": nid, "name": res.programs[c].nodes[nid].name, "kind": kinds[(c, nid)],
                          "instances": len(ts), "measured_s": sum(ts) / len(ts), "simulated_s": ex.end[g] - ex.start[g],
                          "algorithm_model_s": sum(algo[(c, nid)]) / len(ts)})
    return out_nodes


def step_dict(res: StepReplay) -> dict[str, Any]:
    """Summary: measured vs simulated communication per class and kind, wall vs simulated step."""
    ops = measured_nodes(res)
    per_class = []
    for c, p in enumerate(res.programs):
        mine = [o for o in ops if o["class"] == c]
        by_kind = {k: {"nodes": sum(1 for o in mine if o["kind"] == k),
                       "measured_s": sum(o["measured_s"] for o in mine if o["kind"] == k),
                       "algorithm_model_s": sum(o["algorithm_model_s"] for o in mine if o["kind"] == k),
                       "simulated_s": sum(o["simulated_s"] for o in mine if o["kind"] == k)} for k in _KINDS}
        per_class.append({"class_key": dict(p.class_key), "ranks": res.execution.ranks[c],
                          "comm_measured_s": sum(o["measured_s"] for o in mine),
                          "comm_simulated_s": sum(o["simulated_s"] for o in mine),
                          "comm_algorithm_model_s": sum(o["algorithm_model_s"] for o in mine),
                          "by_kind": {k: v for k, v in by_kind.items() if v["nodes"]}})
    starts = [rec["start_ns"] for out in res.results for rec in out["records"]]
    ends = [rec["end_ns"] for out in res.results for rec in out["records"]]
    return {
        "kind": "tensorstage-replay-step",
        "inputs": res.inputs,
        "network": res.network,
        "collectives": res.collectives,
        "links": {"ranks": res.links.ranks, "node_size": res.links.node_size,
                  "tiers": [{"name": t.name, "rate_Bps": t.rate_Bps, "latency_s": t.latency_s}
                            for t in res.links.tiers]},
        "scale": res.inputs.get("scale"),
        "compute": res.inputs.get("compute"),
        "communication_nodes": len(ops),
        "operations_run": sum(len(out["records"]) for out in res.results),
        "measured_wall_s": (max(ends) - min(starts)) * 1e-9 if starts else 0.0,
        "simulated_step_s": res.execution.step_time_s,
        "per_class": per_class,
        "notes": res.notes,
    }
