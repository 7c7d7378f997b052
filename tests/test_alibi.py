"""ALiBi positions (BLOOM, MPT) and the BLOOM preset, against PyTorch and published counts.

* A tiny BLOOM-style PyTorch model written here from the published architecture (Le Scao et al.
  2022, arXiv 2211.05100 sec. 3.2; HF ``modeling_bloom``): LayerNorm after the word embedding,
  ALiBi bias added to the scores by ``baddbmm`` (Press et al. 2022: head i of n has slope
  ``2^(-8 i / n)`` times the key position), biases on every linear, GELU 4h MLP, head tied to the
  embedding. FLOPs (``FlopCounterMode``) and saved bytes (saved-tensor hooks, as
  ``tests/test_graph_torch.py``) equal the graph's; parameters equal ``param_counts``.
* ALiBi has no weights and no matrix FLOPs: against the same model without positions, parameters,
  FLOPs and saved bytes are equal, and the materialized path does one extra add over the
  b*nh*s*s scores per layer; a flash kernel takes the slopes at the same cost (FlashAttention-2
  ``alibi_slopes``).
* BLOOM-176B: 176,247,271,424 parameters (bigscience/bloom model card); BLOOM-7B1 (30 layers,
  4096 hidden, 32 heads): 7,069,016,064 (bigscience/bloom-7b1 model card).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorstage.graph import GraphOptions, build_graph
from tensorstage.lower import graph_options
from tensorstage.lower.blocks import lower_blocks
from tensorstage.model import get_preset, param_counts
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel import ParallelPlan
from tests.test_graph_torch import NLL_TOTAL_WEIGHT_BYTES, B, GeluMLP, S, measure, ours

SPEC = ModelSpec(name="tiny-bloom", num_layers=2, hidden=64, num_heads=4, ffn=256, vocab=96, max_seq=32,
                 activation="gelu", norm="layernorm", positions="alibi", embed_norm=True, tied_embeddings=True,
                 qkv_bias=True, out_bias=True, mlp_bias=True)


def alibi_slopes(n: int) -> torch.Tensor:
    """Press et al. 2022: geometric slopes 2^(-8/n), 2^(-16/n), ... for n (a power of 2) heads."""
    return torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)])


class AlibiAttention(nn.Module):
    """BLOOM attention: fused QKV, scores = baddbmm(alibi, q, k^T, alpha=1/sqrt(d)), causal mask."""

    def __init__(self, h: int, nh: int, s_max: int, p_drop: float) -> None:
        super().__init__()
        self.nh, self.dh, self.p = nh, h // nh, p_drop
        self.qkv = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)
        pos = torch.arange(s_max).float()
        self.register_buffer("alibi", (alibi_slopes(nh)[:, None, None] * pos[None, None, :]))  # (nh, 1, s)
        self.register_buffer("mask", torch.full((s_max, s_max), float("-inf")).triu(1))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, self.nh, 3, self.dh).unbind(3)
        q = q.transpose(1, 2).reshape(b * self.nh, s, self.dh)
        k = k.permute(0, 2, 3, 1).reshape(b * self.nh, self.dh, s)
        v = v.transpose(1, 2).reshape(b * self.nh, s, self.dh)
        bias = self.alibi[:, :, :s].repeat(b, 1, 1)  # (b*nh, 1, s), as build_alibi_tensor
        scores = torch.baddbmm(bias, q, k, beta=1.0, alpha=1 / math.sqrt(self.dh)) + self.mask[:s, :s]
        probs = torch.softmax(scores, dim=-1)
        if self.p:
            probs = F.dropout(probs, self.p, training=True)
        ctx = torch.bmm(probs, v).view(b, self.nh, s, self.dh).transpose(1, 2).reshape(b, s, -1)
        return self.dense(ctx)


class BloomBlock(nn.Module):
    def __init__(self, spec: ModelSpec, p_drop: float) -> None:
        super().__init__()
        h = spec.hidden
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = AlibiAttention(h, spec.num_heads, spec.max_seq, p_drop)
        self.mlp = GeluMLP(h, spec.ffn)
        self.p = p_drop

    def forward(self, x):
        a = self.attn(self.ln1(x))
        x = x + (F.dropout(a, self.p, training=True) if self.p else a)
        m = self.mlp(self.ln2(x))
        return x + (F.dropout(m, self.p, training=True) if self.p else m)


class BloomLM(nn.Module):
    def __init__(self, spec: ModelSpec, p_drop: float = 0.0) -> None:
        super().__init__()
        self.p = p_drop
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.embed_ln = nn.LayerNorm(spec.hidden)
        self.layers = nn.ModuleList(BloomBlock(spec, p_drop) for _ in range(spec.num_layers))
        self.ln_f = nn.LayerNorm(spec.hidden)

    def forward(self, ids, labels):
        x = self.embed_ln(self.embed(ids))
        if self.p:
            x = F.dropout(x, self.p, training=True)
        for layer in self.layers:
            x = layer(x)
        logits = self.ln_f(x) @ self.embed.weight.t()  # tied head
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.mark.parametrize("p_drop", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_bloom_block_matches_pytorch(p_drop: float) -> None:
    torch.manual_seed(0)
    model = BloomLM(SPEC, p_drop)
    t_fwd, t_bwd, t_saved = measure(model, SPEC.vocab)
    kw = {"dropout": True, "dropout_mask_dtype": "fp32"} if p_drop else {}
    o_fwd, o_bwd, o_saved = ours(SPEC, **kw)
    assert (o_fwd, o_bwd) == (t_fwd, t_bwd)
    assert o_saved == t_saved - NLL_TOTAL_WEIGHT_BYTES
    n_params = sum(p.numel() for p in model.parameters())
    assert param_counts(SPEC).total == build_graph(SPEC, "train").param_count() == n_params


def _totals(spec: ModelSpec, impl: str) -> dict:
    opts = GraphOptions(attention_impl=impl, precision="fp32")
    return build_graph(spec, "train", opts).costs({"b": B, "s": S}, exact=True).totals


@pytest.mark.parametrize("impl", ["materialized", "flash"])
def test_alibi_costs_one_bias_add_and_no_weights(impl: str) -> None:
    plain = SPEC.model_copy(update={"positions": "none"})
    with_alibi, without = _totals(SPEC, impl), _totals(plain, impl)
    for metric in ("fwd_flops", "bwd_input_flops", "bwd_weight_flops", "activation_bytes"):
        assert with_alibi[metric] == without[metric], metric
    extra_add = SPEC.num_layers * B * SPEC.num_heads * S * S if impl == "materialized" else 0
    assert with_alibi["fwd_vector_flops"] - without["fwd_vector_flops"] == extra_add
    assert param_counts(SPEC).total == param_counts(plain).total


def test_alibi_bias_is_sharded_by_heads_under_tp() -> None:
    plan = ParallelPlan(tp=2, seq=S, micro_batch=B)
    opts = graph_options(plan, GraphOptions(attention_impl="materialized"))
    layer = lower_blocks(build_graph(SPEC, "train", opts), plan)["dense"]
    add = next(n for n in layer.forward if n.name == "attn.alibi")
    assert add.flops == B * (SPEC.num_heads // 2) * S * S  # one add per score of this rank's heads
    assert sum(n.kind.name == "COLL" for n in layer.forward) == 2  # Megatron's two all-reduces, no more


def test_bloom_presets_match_published_parameter_counts() -> None:
    bloom = get_preset("bloom-176b")
    assert (bloom.num_layers, bloom.hidden, bloom.num_heads, bloom.vocab) == (70, 14336, 112, 250880)
    assert bloom.positions == "alibi" and bloom.embed_norm
    assert param_counts(bloom).total == 176_247_271_424
    b7 = bloom.model_copy(update={"name": "bloom-7b1", "num_layers": 30, "hidden": 4096, "num_heads": 32,
                                  "ffn": 4 * 4096})
    assert param_counts(b7).total == 7_069_016_064
    assert param_counts(b7).embedding == 1_027_604_480
