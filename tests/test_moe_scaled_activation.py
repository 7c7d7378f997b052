"""Megatron-Core's MoE "scaled activation": routing probabilities multiply the experts' activation.

With Megatron kernels the probabilities travel with the tokens (``permuted_probs``) and the fused
GLU scales each row (``weighted_bias_swiglu_impl``); the combine is a plain scatter-add. So the
expert outputs (``top_k`` rows of ``h`` per token) are no longer kept for the probabilities'
gradient; the GLU keeps its two inputs and the probabilities. HF / PyTorch (no Megatron kernels)
keep weighting in the combine. Checked on a Qwen3-30B-A3B layer: structure, gradient path, and the
saved-bytes change in closed form.
"""

from __future__ import annotations

from tensorstage.graph import build_graph
from tensorstage.graph.options import GraphOptions
from tensorstage.model import resolve_model

T, H = 2048, 2048  # tokens of one micro-batch (b*s), hidden


def _moe_block(megatron: bool):
    g = build_graph(resolve_model("qwen3-30b-a3b"), "train", GraphOptions(megatron_fusions=megatron))
    return g, g.blocks()["moe"]


def test_probabilities_scale_the_activation_under_megatron_kernels():
    _, blk = _moe_block(True)
    ops = {op.name: op for op in blk.forward}
    glu = ops["moe.experts.act"]
    # gate and up are views of the experts' fused fc1 output (TEGroupedMLP's linear_fc1)
    assert glu.kind == "glu" and [t.name for t in glu.saved] == ["moe.experts.gate", "moe.experts.up",
                                                                 "moe.permuted_probs"]
    assert ops["moe.experts.fc1"].inputs[1].dims == ("e", "h", "two", "fe")
    combine = ops["moe.combine"]
    assert [t.name for t in combine.inputs] == ["moe.experts.down_proj", "moe.dispatch.token_index"]
    assert [t.name for t in combine.saved] == ["moe.dispatch.token_index"]
    saved = {t.name for t in blk.saved}
    assert "moe.experts.down_proj" not in saved and "moe.permuted_probs" in saved
    # the router still learns: its weight gradient exists, reached through the GLU's probability gradient
    bwd = {op.name for op in blk.backward}
    assert "moe.permuted_probs.grad" in bwd and any(n.startswith("moe.router.grad_w") for n in bwd)


def test_saved_bytes_change_in_closed_form():
    """Per routed row (r = T * top_k of them, dropless, one rank): the expert output (``h`` bf16) is
    no longer kept by the combine, nor the combine's slot gates (bf16) and slot permutation (int64);
    the GLU keeps the permuted probability (bf16) instead; and the fused GLU keeps no activation
    output of its own (eager silu + mul keep ``silu(gate)``, ``fe`` bf16), while the down-projection
    keeps its input either way."""
    from tensorstage.lower import blocks as lb
    from tensorstage.lower import lower_blocks_cached
    from tensorstage.parallel.plan import ParallelPlan

    def moe_saved(megatron: bool) -> dict[str, int]:
        plan = ParallelPlan.parse(dict(seq=T, global_batch=1, micro_batch=1, megatron_fusions=megatron))
        graph, _ = lower_blocks_cached(resolve_model("qwen3-30b-a3b"), plan)
        ctx = lb._Context.make(graph, plan, True, False)
        blk = graph.blocks()["moe"]
        low = lb.BlockLowerer(ctx, "moe", blk)
        return {t.name: low._saved_bytes(t) for t in blk.saved if t.name.startswith("moe.") and t.role != "weight"}

    hf, mc = moe_saved(False), moe_saved(True)
    rows, fe = T * 8, 768
    assert hf["moe.experts.down_proj"] == rows * H * 2 and "moe.experts.down_proj" not in mc
    assert mc["moe.permuted_probs"] == rows * 2 and "moe.combine.slot_gates" not in mc
    expected = rows * H * 2 + rows * 2 + rows * 8 - rows * 2 + rows * fe * 2
    assert sum(hf.values()) - sum(mc.values()) == expected
