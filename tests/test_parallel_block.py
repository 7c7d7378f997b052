"""The parallel attention + MLP block (GPT-J, PaLM, GPT-NeoX) against PyTorch and Megatron-style TP.

* A tiny PyTorch model written here from the published blocks (GPT-J ``GPTJBlock``:
  ``x + attn(ln_1(x)) + mlp(ln_1(x))``, dropout on each branch; GPT-NeoX ``GPTNeoXLayer`` with
  ``use_parallel_residual``: two untied norms), measured with the same FLOP counter and
  saved-tensor hooks as ``tests/test_graph_torch.py``: forward/backward FLOPs and saved bytes equal
  the graph's, parameters equal ``param_counts`` and the graph's weights.
* Tensor parallelism: the two branches' row-parallel partial sums are added before one all-reduce
  (PaLM sec. 2 "parallel layers"; GPT-NeoX ``gpt_j_residual``: "we can do a single allreduce after
  we add mlp / attn outputs"), so a layer's forward has one all-reduce where the sequential block
  has two (Korthikanti et al. 2022 sec. 4.2); with one shared norm the backward also has one (the
  two column-parallel input gradients are summed first), with two norms it has two. With sequence
  parallelism: one reduce-scatter forward and one all-gather per norm; backward one all-gather of the
  output gradient, one re-gather and one reduce-scatter per norm.
* Hugging Face import: ``GPTJForCausalLM`` and ``GPTNeoXForCausalLM`` with ``use_parallel_residual``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorstage.graph import GraphOptions, build_graph
from tensorstage.lower import graph_options
from tensorstage.lower.blocks import lower_blocks
from tensorstage.model.hf import load_hf_config, spec_from_hf_config
from tensorstage.model.params import param_counts
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind
from tests.test_graph_torch import NLL_TOTAL_WEIGHT_BYTES, Attention, GeluMLP, measure, ours


def _spec(norms: int = 1, **kw: object) -> ModelSpec:
    return ModelSpec(name="tiny-gptj", num_layers=2, hidden=64, num_heads=4, ffn=256, vocab=96, max_seq=32,
                     activation="gelu", norm="layernorm", positions="rope", mlp_bias=True,
                     parallel_block=True, parallel_norms=norms, **kw)


class ParallelBlock(nn.Module):
    """GPT-J / GPT-NeoX parallel residual block."""

    def __init__(self, spec: ModelSpec, p_drop: float) -> None:
        super().__init__()
        h = spec.hidden
        self.attn = Attention(h, spec.num_heads, spec.kv_heads, spec.dim_head, spec.qkv_bias, True, p_drop,
                              spec.max_seq)
        self.mlp = GeluMLP(h, spec.ffn)
        self.ln1 = nn.LayerNorm(h)
        self.ln2 = nn.LayerNorm(h) if spec.parallel_norms == 2 else None
        self.p = p_drop

    def forward(self, x):
        a_in = self.ln1(x)
        a = self.attn(a_in)
        m = self.mlp(self.ln2(x) if self.ln2 is not None else a_in)
        if self.p:
            a = F.dropout(a, self.p, training=True)
            m = F.dropout(m, self.p, training=True)
        return x + a + m


class ParallelLM(nn.Module):
    def __init__(self, spec: ModelSpec, p_drop: float = 0.0) -> None:
        super().__init__()
        self.p = p_drop
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(ParallelBlock(spec, p_drop) for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, spec.vocab, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        if self.p:
            x = F.dropout(x, self.p, training=True)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.mark.parametrize(("norms", "p_drop"), [(1, 0.0), (1, 0.1), (2, 0.1)], ids=["gptj", "gptj-drop", "neox-drop"])
def test_flops_saved_bytes_and_params_match_pytorch(norms: int, p_drop: float) -> None:
    spec = _spec(norms)
    torch.manual_seed(0)
    model = ParallelLM(spec, p_drop)
    t_fwd, t_bwd, t_saved = measure(model, spec.vocab)
    kw = {"dropout": True, "dropout_mask_dtype": "fp32"} if p_drop else {}
    o_fwd, o_bwd, o_saved = ours(spec, **kw)
    assert (o_fwd, o_bwd) == (t_fwd, t_bwd)
    assert o_saved == t_saved - NLL_TOTAL_WEIGHT_BYTES
    n_params = sum(p.numel() for p in model.parameters())
    assert param_counts(spec).total == build_graph(spec, "train").param_count() == n_params


def _tp_colls(spec: ModelSpec, **plan_kw: object) -> tuple[list, list]:
    plan = ParallelPlan(seq=64, **plan_kw)
    plan.validate_for(spec)
    opts = graph_options(plan, GraphOptions(dropout=True))
    layer = lower_blocks(build_graph(spec, "train", opts), plan)["dense"]
    return [[(n.comm, n.comm_bytes) for n in nodes if n.kind == NodeKind.COLL]
            for nodes in (layer.forward, layer.backward)]


@pytest.mark.parametrize("norms", [1, 2])
def test_tp_one_all_reduce_for_both_branches(norms: int) -> None:
    s, b, h = 64, 1, 64
    sbh = s * b * h * 2  # bf16
    fwd, bwd = _tp_colls(_spec(norms), tp=2)
    assert fwd == [(CollKind.ALL_REDUCE, sbh)]
    assert bwd == [(CollKind.ALL_REDUCE, sbh)] * norms
    seq_fwd, seq_bwd = _tp_colls(_spec(norms).model_copy(update={"parallel_block": False, "parallel_norms": 1}),
                                 tp=2)
    assert seq_fwd == seq_bwd == [(CollKind.ALL_REDUCE, sbh)] * 2  # the sequential block: Megatron's g and f
    sp_fwd, sp_bwd = _tp_colls(_spec(norms), tp=2, sp=True)
    ag, rs = (CollKind.ALL_GATHER, sbh // 2), (CollKind.REDUCE_SCATTER, sbh)
    # SP: each norm's output is all-gathered once (one shared norm: once), one reduce-scatter after the sum
    assert sorted(sp_fwd) == sorted([ag] * norms + [rs])
    # backward: one all-gather of the output gradient serves both branches (their dropout backward runs
    # on the full sequence, as its forward), Megatron's re-gather of each norm output, and one
    # reduce-scatter per norm of the summed input gradients (the sequential block: 4 AG + 2 RS)
    assert sorted(sp_bwd) == sorted([ag] * (1 + norms) + [rs] * norms)


def test_hf_gptj_and_neox_import_the_parallel_block() -> None:
    # tests/data/hf/gpt-j-6b.json: EleutherAI/gpt-j-6b config.json (28 layers, n_embd 4096, 16 heads)
    gptj = load_hf_config(Path(__file__).parent / "data" / "hf" / "gpt-j-6b.json")
    assert (gptj.parallel_block, gptj.parallel_norms, gptj.ffn) == (True, 1, 16384)
    # closed form of GPT-J-6B's PyTorch parameters without the lm_head bias: embedding + head 2*V*h,
    # per layer 4h^2 attention + 2*h*f + f + h MLP + 2h for ln_1, plus ln_f 2h
    h, f, v, L = 4096, 16384, 50400, 28
    assert param_counts(gptj).total == 2 * v * h + L * (4 * h * h + 2 * h * f + f + h + 2 * h) + 2 * h
    neox = {"architectures": ["GPTNeoXForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
            "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 96}
    assert spec_from_hf_config(neox, "n").parallel_norms == 2
    assert not spec_from_hf_config({**neox, "use_parallel_residual": False}, "n").parallel_block


def test_parallel_norms_without_parallel_block_is_an_error() -> None:
    from tensorstage.errors import SpecError

    with pytest.raises(SpecError, match="parallel_norms"):
        ModelSpec.parse({"name": "x", "num_layers": 1, "hidden": 8, "num_heads": 2, "ffn": 8, "vocab": 8,
                         "parallel_norms": 2})
