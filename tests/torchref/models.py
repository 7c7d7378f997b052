"""Tiny models for the reference runs, named like torchtitan's Llama so TP plans read the same.

Sizes are small on purpose (hidden 16-64): only byte counts matter, not numerics.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPStack(nn.Module):
    """``layers`` blocks of Linear(h, ffn) -> ReLU -> Linear(ffn, h), then an optional head Linear(h, vocab).

    Used by DDP (flat parameter list) and FSDP2 (one ``fully_shard`` unit per block, head on the root).
    """

    def __init__(self, hidden: int, ffn: int, layers: int, vocab: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(), nn.Linear(ffn, hidden)) for _ in range(layers)
        )
        self.head = nn.Linear(hidden, vocab) if vocab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x) if self.head is not None else x


class Attention(nn.Module):
    """Multi-head self-attention with separate wq/wk/wv/wo; head count inferred from the local weight.

    Inferring heads from ``wq``'s local output size lets the same code run unsharded and column-sharded.
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.wq = nn.Linear(hidden, hidden, bias=False)
        self.wk = nn.Linear(hidden, hidden, bias=False)
        self.wv = nn.Linear(hidden, hidden, bias=False)
        self.wo = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """Megatron MLP: w1 (h -> ffn, column parallel), ReLU, w2 (ffn -> h, row parallel)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = Attention(hidden, heads)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.feed_forward = FeedForward(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Experts(nn.Module):
    """``n`` local experts, each Linear(h, ffn) -> ReLU -> Linear(ffn, h), applied to contiguous token runs."""

    def __init__(self, n: int, hidden: int, ffn: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(FeedForward(hidden, ffn) for _ in range(n))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for expert, c in zip(self.experts, counts, strict=True):
            outs.append(expert(x[start:start + c]))
            start += c
        return torch.cat(outs, dim=0)


class TinyLM(nn.Module):
    """Embedding -> ``layers`` Blocks -> LayerNorm -> LM head, torchtitan names (``tok_embeddings`` ... ``output``)."""

    def __init__(self, vocab: int, hidden: int, heads: int, ffn: int, layers: int = 1) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))
