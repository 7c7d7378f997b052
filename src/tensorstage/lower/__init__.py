"""Lowering: ``ModelSpec + ParallelPlan`` -> one :class:`Program` per rank class.

:func:`lower` is the one entry point the trace writer, the simulator and the CLI use. It builds the
symbolic graph for the plan's phase with options taken from the plan (recompute, dtype, MoE
capacity/skew), shards every block (:mod:`tensorstage.lower.blocks`) and assembles the step
(:mod:`tensorstage.lower.assemble`). See :mod:`tensorstage.lower.steps` for the contract between
the two halves.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from tensorstage.graph.graph import Graph, build_graph
from tensorstage.graph.options import GraphOptions
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel.mesh import Mesh
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import Program


@dataclass
class Lowered:
    """The result of :func:`lower`: Programs (one per rank class) and what produced them."""

    programs: list[Program]
    mesh: Mesh
    graph: Graph
    plan: ParallelPlan
    spec: ModelSpec
    # tokens the whole step processes (global batch x new tokens per sequence): tokens/s = this / step
    tokens_per_step: int


def graph_options(plan: ParallelPlan, base: GraphOptions | None = None) -> GraphOptions:
    """Graph-build options for ``plan``: the plan's phase, recompute policy, dtype and MoE routing
    override ``base`` (which keeps conventions the plan does not name); the plan's graph conventions
    (attention impl and FLOP convention, dropout, Megatron fusions) override it only where given."""
    base = base or GraphOptions()
    conventions = ("attention_impl", "attention_flops", "dropout", "megatron_fusions")
    base = replace(base, **{k: getattr(plan, k) for k in conventions if getattr(plan, k) is not None})
    return replace(
        base,
        phase=plan.phase,
        recompute=plan.recompute if plan.phase == "train" else "none",
        recompute_modules=tuple(plan.recompute_modules or ()),
        precision=plan.dtype,
        capacity_factor=plan.capacity_factor if plan.capacity_factor is not None else base.capacity_factor,
        routing_skew=max(plan.routing_skew, base.routing_skew),
    )


@functools.lru_cache(maxsize=16)
def _graph(spec: ModelSpec, opts: GraphOptions) -> Graph:
    """The symbolic graph, shared by lowerings of the same model and options: plans that differ only
    in batch or schedule (a design-space sweep, the simulator's steady-state runs) reuse its
    compiled cost functions instead of rebuilding and re-lambdifying them. Graphs are read-only
    to the lowering, so sharing is safe. 16: a sweep over two models x three recompute policies x
    two dtypes keeps every graph (with 4 it rebuilt one on most plans)."""
    return build_graph(spec, opts.phase, opts)


#: Per-micro-batch block lowerings of recent (graph, plan-without-global-batch) pairs: plans that differ
#: only in the global batch (the steady-state extrapolation's three short steps, batch sweeps) lower
#: the same blocks; assembly only reads them. Keyed by the graph's identity (checked on a hit).
_BLOCKS: OrderedDict[tuple[int, str, bool], tuple[Graph, dict[str, Any]]] = OrderedDict()
_BLOCKS_MAX = 8


def lower_blocks_cached(spec: ModelSpec, plan: ParallelPlan, options: GraphOptions | None = None,
                        fuse: bool = False) -> tuple[Graph, dict[str, Any]]:
    """The graph and per-micro-batch block lowerings :func:`lower` assembles (validates the plan;
    cached: see :data:`_BLOCKS`). Calling it before forking workers that lower plans differing only
    in the global batch lets them all start from the cache."""
    from tensorstage.lower.blocks import lower_blocks

    plan.validate_for(spec)
    opts = graph_options(plan, options)
    graph = _graph(spec, opts)
    key = (id(graph), plan.model_copy(update={"global_batch": 0}).model_dump_json(), fuse)
    hit = _BLOCKS.get(key)
    if hit is not None and hit[0] is graph:
        _BLOCKS.move_to_end(key)
        return graph, hit[1]
    blocks = lower_blocks(graph, plan, overlap_tp_comm=plan.tp_comm_overlap)
    if fuse:
        from tensorstage.lower.fuse import fuse_blocks

        blocks = fuse_blocks(blocks, split_backward=plan.schedule.startswith("zb"))
    _BLOCKS[key] = (graph, blocks)
    while len(_BLOCKS) > _BLOCKS_MAX:
        _BLOCKS.popitem(last=False)
    return graph, blocks


def lower(spec: ModelSpec, plan: ParallelPlan, options: GraphOptions | None = None, fuse: bool = False) -> Lowered:
    """Lower ``spec`` under ``plan`` to per-rank-class Programs (validates the plan first).

    ``fuse`` merges runs of compute nodes between communications into one node each
    (:mod:`tensorstage.lower.fuse`): same simulated time, several times fewer nodes.
    """
    from tensorstage.lower.assemble import assemble

    graph, blocks = lower_blocks_cached(spec, plan, options, fuse)
    mesh = plan.mesh()
    programs = assemble(graph, plan, blocks, mesh)
    new_tokens = 1 if plan.phase == "decode" else plan.seq
    return Lowered(programs, mesh, graph, plan, spec, plan.global_batch * new_tokens)


__all__ = ["Lowered", "graph_options", "lower", "lower_blocks_cached"]
