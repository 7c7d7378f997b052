"""Whole-microsecond COMP durations from our compute model, for replaying traces in another simulator.

Why: Chakra's ``duration_micros`` is an integer number of microseconds, and ASTRA-sim's replay mode
(roofline off) charges each COMP node exactly that (0 -> 1 ns). Rounding each node on its own
would lose up to 0.5 us per node, which over thousands of sub-microsecond kernels shifts the
step by milliseconds. We round the *running total* instead: in node order within each program,
node ``i`` gets ``round(T_i) - round(T_{i-1})`` where ``T_i`` is the exact sum (in us) of the
times of COMP nodes ``0..i`` by :meth:`ComputeModel.time_s`. Every node is then within 1 us of its
exact time, and every prefix sum of a program's durations (so the compute total of a rank)
within 0.5 us of the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tensorstage.schedule.program import Node, NodeKind, Program
from tensorstage.sim.compute import ComputeModel


def node_time_s(compute: ComputeModel, node: Node) -> float:
    """A COMP node's time exactly as the engine charges it (``sim/engine.py`` ``_comp_durations``)."""
    return compute.time_s(node.flops, node.tensor_bytes, node.op, node.gemm, node.category)


def compute_durations_us(program: Program, compute: ComputeModel) -> dict[int, int]:
    """``{node id: duration_micros}`` of every COMP node of ``program`` (running-total rounding)."""
    out: dict[int, int] = {}
    total_us = 0.0
    written = 0
    for node in program.nodes:
        if node.kind != NodeKind.COMP:
            continue
        total_us += node_time_s(compute, node) * 1e6
        target = math.floor(total_us + 0.5)
        out[node.id] = target - written
        written = target
    return out


def duration_micros_fn(programs: Sequence[Program], compute: ComputeModel) -> Callable[[Node], int]:
    """A ``Node -> duration_micros`` function over the nodes of ``programs`` (for the trace writer).

    Nodes are looked up by object identity: the writer encodes these very ``Node`` objects, and
    node ids repeat across programs.
    """
    table: dict[int, int] = {}
    for program in programs:
        per_id = compute_durations_us(program, compute)
        for node in program.nodes:
            if node.kind == NodeKind.COMP:
                table[id(node)] = per_id[node.id]

    def duration(node: Node) -> int:
        return table[id(node)]

    return duration
