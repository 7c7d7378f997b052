"""Selective recompute of chosen submodules (Megatron-Core ``--recompute-modules``), closed forms.

Llama-3 8B layer (SwiGLU, RMSNorm), bf16, micro-batch 1, sequence 2048, TP 1. Saved bytes per layer
and per micro-batch against hand counts: ``mlp`` drops the four ``b*s*f`` tensors inside the MLP
(gate and up outputs, activation, gated product) and re-runs its three GEMMs; ``layernorm``
(output-discarding) drops both pre-norm outputs the projections save (``2*b*s*h``; the norms' own
fp32 inverse RMS, a ``b*s`` internal, stays saved as for every re-run op); the default is
Megatron's ``core_attn``.
"""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.lower import lower_blocks_cached
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan

B, S, H, F = 1, 2048, 4096, 14336


def _dense(modules: str | None, dtype: str = "bf16"):
    plan = ParallelPlan.parse(dict(tp=1, pp=1, dp=1, seq=S, global_batch=1, micro_batch=1, recompute="selective",
                                   recompute_modules=modules, zero=0, dtype=dtype, sp=False))
    graph, blocks = lower_blocks_cached(resolve_model("llama3-8b"), plan)
    return graph.blocks()["dense"], blocks["dense"]


def test_default_is_core_attn():
    assert _dense(None)[1].saved_bytes == _dense("core_attn")[1].saved_bytes


def test_mlp_recompute_closed_form():
    _, base = _dense("core_attn")
    blk, low = _dense("core_attn,mlp")
    assert base.saved_bytes - low.saved_bytes == 4 * B * S * F * 2
    values = {"b": B, "s": S, "h": H, "f": F}
    gemm = [op for op in blk.recompute if op.kind == "einsum"]
    assert len(gemm) == 3
    total = sum(int(op.flops.subs({sym: values[sym.name] for sym in op.flops.free_symbols})) for op in gemm)
    assert total == 3 * 2 * B * S * H * F


def test_layernorm_recompute_discards_the_outputs_the_projections_keep():
    _, base = _dense("core_attn")
    _, low = _dense("core_attn,layernorm")
    assert base.saved_bytes - low.saved_bytes == 2 * B * S * H * 2


def test_bad_modules_are_one_line_errors():
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse(dict(recompute="full", recompute_modules="mlp"))
    assert exc.value.field == "recompute_modules"
    with pytest.raises(SpecError) as exc:
        _dense("mla_up_proj")
    assert exc.value.field == "recompute_modules" and "multi-latent" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse(dict(recompute="selective", recompute_modules="attention"))
    assert "recompute_modules" in exc.value.field and "core_attn" in str(exc.value)
