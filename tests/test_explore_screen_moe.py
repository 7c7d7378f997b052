"""The screen charges an MoE expert GEMM the simulator's measured grouped-GEMM efficiency (capped at
the screen's ceiling rate); dense ops and models are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstage.explore.fastpath import GRAPH_FIELDS, _graph, _grouped_efficiency
from tensorstage.hardware import load_system
from tensorstage.sim.machine import machine_from_system


def _key(recompute: str, dtype: str) -> tuple:
    """The screen's graph key for a plan naming only recompute and dtype (conventions: defaults)."""
    return tuple({"recompute": recompute, "dtype": dtype}.get(k) for k in GRAPH_FIELDS)


def test_expert_gemms_get_the_measured_grouped_efficiency() -> None:
    graph = _graph("qwen3-30b-a3b", _key("none", "bf16"))
    cm = machine_from_system(load_system("dgx-h100-superpod"), "bf16").compute
    assert cm.kernels is not None
    b = graph.bindings
    tp, ep, mb, seq = np.array([1, 2, 1]), np.array([1, 8, 32]), np.array([1.0, 2.0, 4.0]), np.array([4096.0] * 3)
    loc = {"b": mb, "s": seq, "c": seq, "e": b["e"] / ep, "fe": b["fe"] / tp}
    ops = graph.blocks()[graph.layer_kinds[0]].all_ops()
    eff = _grouped_efficiency(graph, ops, loc, cm, 3)
    for i, op in enumerate(ops):
        if op.name == "moe.experts.gate_proj":  # e t h, e h fe -> e t fe: tokens t, width min(fe, h)
            tokens = b["cf"] * seq * mb * b["k"] / (b["e"] / ep)  # routed rows per local expert
            width = np.minimum(b["fe"] / tp, b["h"])
            want = [min(1.0, cm.kernels.grouped_gemm_efficiency(t, w, "bf16")) for t, w in zip(tokens, width, strict=True)]
            assert eff[i] == pytest.approx(want, rel=1e-12)
            assert eff[i][0] < 0.7  # 128 local experts, 256 tokens each: far below the dense rate
            assert eff[i][0] < eff[i][2]  # four local experts see 32x more tokens each
        elif op.name == "moe.experts.gate_proj.grad_w:moe.experts.gate_proj.weight":  # tokens contracted
            tokens = b["cf"] * seq * mb * b["k"] / (b["e"] / ep)
            want = [min(1.0, cm.kernels.grouped_gemm_efficiency(t, min(b["h"], b["fe"] / p), "bf16"))
                    for t, p in zip(tokens, tp, strict=True)]
            assert eff[i] == pytest.approx(want, rel=1e-12)
        elif "experts" not in op.name:
            assert (eff[i] == 1.0).all(), op.name
    assert (eff <= 1.0).all()


def test_dense_models_are_unchanged() -> None:
    graph = _graph("gpt3-175b", _key("none", "bf16"))
    cm = machine_from_system(load_system("dgx-a100-selene"), "bf16").compute
    loc = {"b": np.array([1.0, 2.0]), "s": np.array([2048.0] * 2), "c": np.array([2048.0] * 2)}
    ops = graph.blocks()[graph.layer_kinds[0]].all_ops()
    assert (_grouped_efficiency(graph, ops, loc, cm, 2) == 1.0).all()
