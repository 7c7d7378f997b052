"""One fused MoE layer as the lowering charges it: what the grouped-GEMM efficiency is measured against.

Why a module of its own: ``scripts/calibrate_kernels.py`` derives the grouped-GEMM efficiency
surface (:meth:`tensorstage.sim.kernels.KernelTables.grouped_gemm_efficiency`) by dividing measured
fused MoE layer latencies by this model of the layer, and the tests check the committed surface on
held-out measured layers with the very same model; both must agree on every byte.

The layer (one rank, balanced routing, ``t`` tokens, top-``k`` of ``e`` experts, ``ep``-way expert
parallel, ``tp``-way expert tensor parallel, hidden ``h``, expert width ``f``): ``g = e / ep`` local
experts receive ``r = t * k / ep`` routed rows; the up-projection is one grouped GEMM of width
``2 * f / tp`` when gated (SwiGLU: gate and up in one GEMM, as fused MoE kernels run it) and the
down-projection one of contraction ``f / tp``. The element-wise kernels carry the graph's bytes
(``tensorstage.graph.builder``: ``dispatch`` reads the tokens and their expert ids and writes the
routed rows and their int64 index; the activation reads the up-projection and writes the expert
width; ``combine`` reads the routed rows, their gates and two int64 indices and writes the tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorstage.sim.compute import GROUPED_OP, ComputeModel, Gemm

#: bytes of an int64 token / slot index
INDEX_BYTES = 8


@dataclass(frozen=True)
class MoeLayer:
    """One measured MoE layer configuration (per rank)."""

    tokens: int
    hidden: int
    inter: int
    topk: int
    experts: int
    tp: int = 1
    ep: int = 1
    gated: bool = True

    @property
    def local_experts(self) -> int:
        return self.experts // self.ep

    @property
    def routed_rows(self) -> float:
        return self.tokens * self.topk / self.ep

    def gemms(self, weight_bytes: int = 2, act_bytes: int = 2) -> list[tuple[float, float, Gemm]]:
        """``(flops, bytes, (experts, tokens per expert, n, k))`` of the up- and down-projection."""
        g, fl, h, r = self.local_experts, self.inter // self.tp, self.hidden, self.routed_rows
        me = max(1, round(r / g))
        n1 = 2 * fl if self.gated else fl
        return [(2 * r * n1 * h, act_bytes * r * (h + n1) + weight_bytes * g * h * n1, (g, me, n1, h)),
                (2 * r * h * fl, act_bytes * r * (h + fl) + weight_bytes * g * h * fl, (g, me, h, fl))]

    def elementwise_s(self, compute: ComputeModel, act_bytes: int = 2) -> float:
        """Dispatch (permute), activation and combine (un-permute + gate-weighted sum) as charged."""
        t, h, r = self.tokens, self.hidden, self.routed_rows
        fl = self.inter // self.tp
        n1 = 2 * fl if self.gated else fl
        dispatch = act_bytes * t * h + INDEX_BYTES * t * self.topk + act_bytes * r * h + INDEX_BYTES * r
        activation = act_bytes * r * (n1 + fl)
        combine = act_bytes * r * h + act_bytes * r + 2 * INDEX_BYTES * r + act_bytes * t * h
        return (compute.time_s(0, dispatch, "dispatch") + compute.time_s(0, activation, "elementwise")
                + compute.time_s(0, combine, "combine"))

    def time_s(self, compute: ComputeModel, grouped: bool = True) -> float:
        """The layer on ``compute``: its expert GEMMs as ``grouped_matmul`` nodes (with the grouped-GEMM
        efficiency of ``compute``'s tables) or, ``grouped=False``, as dense-table matmuls."""
        wb = 1 if compute.dtype == "fp8" else 2
        op = GROUPED_OP if grouped else "matmul"
        gemm = sum(compute.time_s(f, b, op, g, "fwd") for f, b, g in self.gemms(wb))
        return gemm + self.elementwise_s(compute)
