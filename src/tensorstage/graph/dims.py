"""Named symbolic dimensions and dtypes of the tensor graph.

Why named dims: a sharding pass decides from placements which *named* axis is split (``nh`` by
tensor parallelism, ``s`` by context parallelism, ``e`` by expert parallelism, ``b`` by data
parallelism), so every tensor carries dimension names, never bare sizes. Each name maps to a sympy
expression over a small set of free symbols; most names are their own symbol, a few are derived
(``g = nh / nkv`` query heads per KV head, ``gkv = g + 2`` the heads of one fused QKV group,
``two`` the halves of a fused gate/up projection, ``dq = dn + dr`` MLA query/key head width, ``sk`` the
key length: ``s`` in training and prefill, ``c`` in decode, ``t`` tokens routed per expert).

Free symbols and what binds them:

* per run: ``b`` micro-batch (sequences), ``s`` query tokens per sequence, ``c`` decode context;
* from the model spec: ``h`` hidden, ``nh`` query heads, ``nkv`` KV heads, ``dh`` head dim,
  ``f`` dense FFN width, ``v`` vocabulary, ``e`` routed experts, ``k`` experts per token,
  ``fe`` routed expert width, ``fs`` total shared-expert width, ``ql``/``kvl`` MLA low ranks,
  ``dr``/``dn``/``dv`` MLA rope/nope/value head dims, ``p`` learned-position table rows (max
  sequence), ``w`` sliding-window length, ``cf`` MoE capacity factor (1 = dropless).
* derived: ``skw = min(sk, w)`` keys a sliding-window layer reads in decode.
"""

from __future__ import annotations

import sympy as sp

from tensorstage.errors import SpecError

#: Bytes per element of every dtype the graph uses (``bool``/``u8`` masks are 1 byte, as in PyTorch).
DTYPE_BYTES: dict[str, int] = {
    "fp64": 8,
    "fp32": 4,
    "tf32": 4,
    "bf16": 2,
    "fp16": 2,
    "fp8": 1,
    "int64": 8,
    "int32": 4,
    "u8": 1,
    "bool": 1,
}

FREE_SYMBOLS: tuple[str, ...] = (
    "b",
    "s",
    "c",
    "h",
    "nh",
    "nkv",
    "dh",
    "f",
    "v",
    "e",
    "k",
    "fe",
    "fs",
    "ql",
    "kvl",
    "dr",
    "dn",
    "dv",
    "p",
    "w",
    "cf",
)

SYMBOLS: dict[str, sp.Symbol] = {name: sp.Symbol(name, positive=True) for name in FREE_SYMBOLS}


def sym(name: str) -> sp.Symbol:
    """The sympy symbol of a free dimension name."""
    return SYMBOLS[name]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (raises :class:`SpecError` for unknown names)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise SpecError("dtype", f"unknown dtype {dtype!r}", allowed=sorted(DTYPE_BYTES)) from None


def base_dim_sizes(phase: str) -> dict[str, sp.Expr]:
    """Dimension name -> size expression for one phase (only ``sk`` and ``s`` differ by phase)."""
    S = SYMBOLS
    sizes: dict[str, sp.Expr] = {name: S[name] for name in FREE_SYMBOLS if name not in ("cf", "c")}
    sizes["g"] = S["nh"] / S["nkv"]
    sizes["dq"] = S["dn"] + S["dr"]
    sizes["kvr"] = S["kvl"] + S["dr"]
    sizes["one"] = sp.Integer(1)
    # fused projections (Megatron's linear_qkv and SwiGLU linear_fc1): per KV head its g query heads
    # plus one K and one V head; the gate and up halves of a gated MLP
    sizes["gkv"] = sizes["g"] + 2
    sizes["two"] = sp.Integer(2)
    if phase == "decode":
        sizes["s"] = sp.Integer(1)
        sizes["sk"] = S["c"]
    else:
        sizes["sk"] = S["s"]
    sizes["skw"] = sp.Min(sizes["sk"], S["w"])
    # tokens handled by all routed experts together: b*s*k*cf (cf = 1 is dropless)
    sizes["t"] = S["cf"] * sizes["s"] * S["b"] * S["k"] / S["e"]
    return sizes
