"""Iteration cost of one engine step from the project's graph and compute/collective models.

One engine step runs every layer once over the batch's tokens: prefill chunks (``L`` new tokens of
a request whose first ``P`` prompt tokens are already in the KV cache) and decode tokens (one per
request, attending over its context ``c``). Nothing here is a second cost model:

* **FLOPs and bytes** are the graph's own per-op expressions (:mod:`tensorstage.graph`), evaluated
  with the tensor-parallel dims divided as the block lowering does (``nh``, ``nkv``, ``f``, ``fe``,
  ``fs``, ``v`` over ``tp``; :data:`tensorstage.lower.blocks.TP_SYMBOLS`).
* **Token-linear ops** (projections, MLP/experts, norms, RoPE, KV writes, embedding) are the
  prefill graph's ops at ``b = 1, s = T`` with ``T`` the tokens of the step: a GEMM over the batch's
  tokens reads the weights once. The LM head runs on the ``n_logits`` rows that sample a token (the
  decode graph's head at ``b = n_logits``).
* **Attention** (ops marked ``attn_core``) is per request: a prefill chunk costs the prefill graph's
  attention at ``s = P + L`` minus that at ``s = P`` in FLOPs (exact for the causal convention: the
  query rows of the chunk), and reads the ``P`` cached tokens' K/V on top of the chunk's own
  tensors; a decode token costs the decode graph's attention at ``c``. All requests' attention
  runs as one batched kernel per phase (FlashAttention varlen / paged decode), so FLOPs and bytes
  are summed before the roofline.
* **Time** of every op is :meth:`tensorstage.sim.compute.ComputeModel.time_s` (roofline with the
  device's documented efficiencies, GEMM shape factor and launch cost): a measured kernel table
  behind that interface flows in unchanged.
* **Collectives** come from the block lowering (:func:`tensorstage.lower.blocks.lower_blocks`):
  the placement-derived TP all-reduces / EP all-to-alls of one layer, whose sizes are affine in the
  tokens (read at two sequence lengths), timed by :func:`tensorstage.sim.collectives.collective_time_s`.
* **Attention data parallelism** (``attention_dp``, as TensorRT-LLM / SGLang / vLLM DP-attention
  for MoE): the replica's ``tp`` GPUs each run attention with all heads on their share of the
  requests (KV cache not split by heads: a token's KV lives on one rank), and routed experts are
  split over them by expert parallelism (EP = tp; the dispatch/combine all-to-alls come from the
  block lowering of an EP plan). Per-rank tokens are the step's / tp (balanced ranks assumed).
* **Weights and KV dtypes**: the graph's weights are stored at the serving dtype
  (:data:`WEIGHT_BYTES`: fp8/int8 1 byte, int4/fp4 half a byte), KV in ``kv_dtype``.

Caching: the token-linear time depends only on ``(T, n_logits)`` and is cached; the attention
coefficients are compiled once per layer kind and evaluated vectorised over requests with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import sympy as sp

from tensorstage.errors import SpecError
from tensorstage.graph import GraphOptions, build_graph
from tensorstage.graph.dims import SYMBOLS, dtype_bytes
from tensorstage.graph.graph import Graph
from tensorstage.graph.ir import Op
from tensorstage.lower import graph_options
from tensorstage.lower.blocks import TP_SYMBOLS, lower_blocks
from tensorstage.lower.op_roles import gemm_dims, is_expert_gemm, is_expert_weight, uses_experts
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.sim.collectives import Fabric, collective_time_s, members_per_domain
from tensorstage.sim.compute import GROUPED_OP, ComputeModel

#: Bytes per stored weight element by serving dtype (int4/fp4: two per byte; scales ignored).
WEIGHT_BYTES: dict[str, float] = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "fp4": 0.5}
#: Graph precision policy (compute dtype) per weight dtype: fp8/int8 run on 8-bit tensor cores;
#: weight-only int4/fp4 dequantise to 16-bit and compute there (W4A16).
GRAPH_PRECISION: dict[str, str] = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "int8": "fp8",
                                   "int4": "bf16", "fp4": "bf16"}
KV_DTYPES = ("bf16", "fp16", "fp8", "int8")
#: sequence lengths the collectives of one layer are read at (their sizes are affine in tokens)
_COMM_SEQS = (256, 512)
#: sum of a 1-d array (``np.sum`` without its Python wrapper: the same pairwise sum, faster on short arrays)
_sum = np.add.reduce
#: most (tokens, n_logits) pairs kept in the step-cost memo (cleared when full; the parts stay cached)
_LINEAR_MEMO_MAX = 1 << 18


@dataclass(frozen=True)
class IterationCost:
    """Time of one engine step and its parts (seconds, per replica: every TP rank does the same)."""

    total_s: float
    linear_s: float
    attention_s: float
    comm_s: float
    overhead_s: float
    kernels: int


@dataclass(frozen=True)
class _Term:
    """One op of a layer: flops / bytes as affine functions of the tokens ``T``, and its GEMM (n, k)."""

    kind: str
    flops0: float
    flops1: float
    bytes0: float
    bytes1: float
    gemm_nk: tuple[int, int, int] | None  # (batch, n, k); m = T (or n_logits for the head)
    #: an MoE expert GEMM: ``gemm_nk[0]`` = local experts, and each receives ``m * routed`` rows
    routed: float = 0.0


def _poly(fn, degree: int) -> np.ndarray | None:
    """Coefficients (highest first) of ``fn`` if it is a polynomial of ``degree`` in its argument
    (checked at far points; a sliding-window ``Min`` is not), else None."""
    xs = np.arange(1, degree + 2, dtype=np.float64)
    coef = np.polyfit(xs, fn(xs), degree)
    coef = np.round(coef * 2**20) / 2**20  # the graph's coefficients are exact rationals of small denominators
    far = np.array([997.0, 131071.0])
    want = fn(far)
    if np.allclose(np.polyval(coef, far), want, rtol=1e-9, atol=1e-6):
        return coef
    return None


def _affine(fn, lo: int = 1, hi: int = 2) -> tuple[float, float]:
    a, b = float(fn(lo)), float(fn(hi))
    slope = (b - a) / (hi - lo)
    return a - slope * lo, slope


class _PolyFn:
    """A quadratic with exact coefficients, evaluated elementwise (``__call__``) or at one point (``at``)."""

    def __init__(self, coef: np.ndarray) -> None:
        self.coef = [float(c) for c in coef]
        self._pairs: dict[int, tuple] = {}  # id(other) -> (other, coefficient columns)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        a, b, c = self.coef
        y = np.multiply(x, a)  # (a * x + b) * x + c in place: the same floats, one temporary
        y += b
        y *= x
        y += c
        return y

    def pair_coef(self, other: _PolyFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column vectors of this and ``other``'s coefficients (for :func:`_pair_sums`), kept."""
        got = self._pairs.get(id(other))
        if got is None or got[0] is not other:
            cols = tuple(np.array([[p], [q]]) for p, q in zip(self.coef, other.coef, strict=True))
            got = self._pairs[id(other)] = (other, cols)
        return got[1]

    def at(self, x: float) -> float:
        """The value at one point, in the order ``__call__`` computes each element."""
        a, b, c = self.coef
        return (x * a + b) * x + c


def _pair_sums(f: _PolyFn, g: _PolyFn, x: np.ndarray) -> tuple[float, float]:
    """``(sum f(x), sum g(x))`` of two quadratics in one pass over a 2-row array: each row holds the
    same floats as ``f(x)`` / ``g(x)`` and is summed the same way (a row of a C-ordered array)."""
    a, b, c = f.pair_coef(g)
    y = x * a
    y += b
    y *= x
    y += c
    s = _sum(y, axis=1)
    return float(s[0]), float(s[1])


def _reread(fb, group: float):
    """Decode-attention bytes with the context-dependent part (the K/V cache reads) ``group`` times."""
    if isinstance(fb, _PolyFn):
        a, b, c = fb.coef
        return _PolyFn(np.array([a * group, b * group, c]))
    base = float(fb(np.zeros(1))[0])
    return lambda x: base + (fb(x) - base) * group


class IterationPredictor:
    """Cost of an engine step for one model on one replica of ``tp`` devices (module docstring)."""

    def __init__(self, spec: ModelSpec, compute: ComputeModel, fabric: Fabric | None, tp: int = 1,
                 weight_dtype: str = "bf16", kv_dtype: str | None = None, gpus_per_node: int = 8,
                 attention_dp: bool = False, gqa_kv_reuse: bool = True, fused_gate_up: bool = True) -> None:
        if weight_dtype not in WEIGHT_BYTES:
            raise SpecError("weight_dtype", f"unknown weight dtype {weight_dtype!r}", WEIGHT_BYTES)
        kv = kv_dtype or ("fp16" if weight_dtype == "fp16" else "bf16")
        if kv not in KV_DTYPES:
            raise SpecError("kv_dtype", f"unknown KV-cache dtype {kv!r}", KV_DTYPES)
        if not attention_dp and spec.num_heads % tp:
            divisors = [d for d in range(1, spec.num_heads + 1) if spec.num_heads % d == 0 and d <= 64]
            raise SpecError("tp", f"must divide the model's {spec.num_heads} attention heads, got {tp}", divisors)
        self.spec, self.compute, self.fabric, self.tp = spec, compute, fabric, tp
        # attention data parallelism + expert parallelism over the replica's tp GPUs (module docstring)
        self.dp = tp if attention_dp else 1
        self.ep = tp if attention_dp and spec.moe is not None else 1
        self.weight_dtype, self.kv_dtype = weight_dtype, kv
        # the fused QKV projection and gated activation every serving engine runs (vLLM's
        # QKVParallelLinear and SiluAndMul, SGLang's alike, TensorRT-LLM's fused QKV GEMM): the graph's
        # Megatron-kernel forms are the same kernels; gate/up fused as the engine does
        opts = GraphOptions(precision=GRAPH_PRECISION[weight_dtype], kv_dtype=kv, megatron_fusions=True,
                            fused_gate_up=fused_gate_up)
        self.prefill = build_graph(spec, "prefill", opts)
        self.decode = build_graph(spec, "decode", opts)
        self._param_bytes = dtype_bytes(opts.precision_policy().param_dtype)
        self._wbytes = WEIGHT_BYTES[weight_dtype]
        self.counts = self.prefill.counts()
        self._layer_terms = {k: self._terms(self.prefill, k, core=False) for k in self.prefill.layers}
        self._emb_terms = self._terms(self.prefill, "embedding", core=False)
        self._head_terms = self._terms(self.decode, "head", core=False)
        self._pf_attn = {k: self._core_fns(self.prefill, k, "s") for k in self.prefill.layers}
        self._dc_attn = {k: self._core_fns(self.decode, k, "c") for k in self.decode.layers}
        # query heads per KV head on one rank: TP gives a rank nh/tp query heads and max(1, nkv/tp) KV
        # heads (replicated when tp > nkv); attention-DP keeps every head on each rank
        ranks_tp = 1 if self.dp > 1 else tp
        group = (spec.num_heads / ranks_tp) / max(1.0, spec.kv_heads / ranks_tp)
        if not gqa_kv_reuse and group > 1 and spec.mla is None:
            # one thread block per query head: each reads its KV head's cache itself, so the
            # context-proportional bytes (the K/V reads) are paid once per query head
            self._dc_attn = {k: [(op, ff, _reread(fb, group)) for op, ff, fb in v] for k, v in self._dc_attn.items()}
        self._kv_tok = {k: float(self._eval(self.prefill.layers[k].kv_cache_bytes_per_token))
                        for k in self.prefill.layers}
        self._comm = self._comm_terms(gpus_per_node)
        # decode attention carries its QK^T shape (batch*heads, 1, context, head_dim) so a measured
        # decode-attention table behind ComputeModel applies (plain MHA/GQA layers only)
        self._q_heads = spec.num_heads // (1 if self.dp > 1 else tp)
        self._dec_shape = spec.mla is None and not spec.sliding_window
        self._linear_cache: dict[tuple[int, int], tuple[float, float, int]] = {}
        self._body_cache: dict[int, tuple[float, float, int]] = {}
        self._head_cache: dict[int, float] = {}

    # --- sizes ------------------------------------------------------------------------------
    def _bindings(self, graph: Graph, expert: bool = False) -> dict[str, float]:
        vals = dict(graph.bindings)
        if self.dp > 1:  # attention-DP: nothing tensor-parallel; routed experts split over EP
            if expert and self.ep > 1:
                vals["e"] = vals["e"] / self.ep
            return vals
        for name in TP_SYMBOLS:
            vals[name] = max(1.0, vals[name] / self.tp) if name == "nkv" else vals[name] / self.tp
        vals["v"] = vals["v"] / self.tp
        return vals

    def _eval(self, expr: sp.Expr, graph: Graph | None = None, expert: bool = False, **free: float) -> float:
        vals = self._bindings(graph or self.prefill, expert)
        vals.update(free)
        return float(sp.sympify(expr).xreplace({SYMBOLS[k]: v for k, v in vals.items()}))

    def _fn(self, expr: sp.Expr, graph: Graph, var: str, expert: bool = False):
        """A numpy function of ``var`` (other symbols bound to this replica's local sizes)."""
        vals = self._bindings(graph, expert)
        vals["b"] = 1.0
        subs = {SYMBOLS[k]: v for k, v in vals.items() if k != var}
        f = sp.lambdify([SYMBOLS[var]], sp.sympify(expr).xreplace(subs), "numpy")
        return lambda x: np.asarray(f(x), dtype=np.float64) + 0.0 * np.asarray(x, dtype=np.float64)

    # --- per-op terms ---------------------------------------------------------------------------
    def _weight_delta(self, op: Op, graph: Graph) -> float:
        """Bytes to add to an op's traffic so its weights are read at the serving weight dtype."""
        numel = sum(self._eval(t.numel, graph, is_expert_weight(t)) for t in op.inputs if t.role == "weight")
        return numel * (self._wbytes - self._param_bytes)

    def _gemm_nk(self, op: Op, graph: Graph) -> tuple[int, int, int] | None:
        dims = gemm_dims(op)
        if dims is None:
            return None
        batch, _, n, k = dims

        def size(dims: set[str]) -> int:
            return max(1, int(round(np.prod([self._eval(graph.sizes[d], graph, b=1, s=1, c=1) for d in dims]))))

        batch = batch - {"b", "s", "one"}
        if batch == {"e"} and is_expert_gemm(op):
            # the experts' grouped GEMM: local experts x (their tokens, n, k), tokens set per step
            sizes = self._bindings(graph, expert=True)
            return (max(1, int(round(sizes["e"]))), size(n), size(k))
        if batch:
            return None  # a batched GEMM over model dims (materialized attention): keep the plain ceiling
        return (1, size(n), size(k))

    def _terms(self, graph: Graph, block: str, core: bool) -> list[_Term]:
        blk = graph.blocks()[block]
        out = []
        var = "s" if graph.options.phase == "prefill" else "b"
        for op in blk.all_ops():
            if bool(op.attrs.get("attn_core")) != core:
                continue
            if op.kind == "layout" and not op.attrs.get("copy", True):
                continue  # a view (q/k/v of a fused projection, a split): no kernel runs
            ex = self.dp > 1 and uses_experts(op)
            fl = _affine(self._fn(op.flops + op.vector_flops, graph, var, ex))
            by = _affine(self._fn(op.bytes_read + op.bytes_written, graph, var, ex))
            delta = self._weight_delta(op, graph)
            # per-rank tokens are T / dp: the slopes per step token are the per-rank ones / dp
            gemm = self._gemm_nk(op, graph)
            routed = 0.0
            if gemm is not None and gemm[0] > 1 and self.spec.moe is not None:
                # balanced routing: a step of m tokens sends m * top_k / experts rows to every expert
                moe = self.spec.moe
                routed = moe.top_k / moe.num_experts
            out.append(_Term(GROUPED_OP if routed else op.kind, fl[0], fl[1] / self.dp, by[0] + delta,
                             by[1] / self.dp, gemm, routed))
        return out

    def _core_fns(self, graph: Graph, block: str, var: str) -> list[tuple[str, object, object]]:
        """(kind, flops(x), bytes(x)) of the attention-core ops: numpy polynomials when exact (fast),
        else the compiled expressions."""
        out = []
        for op in graph.layers[block].all_ops():
            if not op.attrs.get("attn_core"):
                continue
            fns = []
            for expr in (op.flops + op.vector_flops, op.bytes_read + op.bytes_written):
                fn = self._fn(expr, graph, var)
                coef = _poly(fn, 2)
                fns.append(fn if coef is None else _PolyFn(coef))
            out.append((op.kind, fns[0], fns[1]))
        return out

    def _comm_terms(self, gpus_per_node: int) -> list[tuple[object, float, float, tuple[int, ...]]]:
        """Collectives of the whole model per step as (kind, bytes0, bytes_per_token, members)."""
        if self.tp == 1 or self.fabric is None or (self.dp > 1 and self.ep == 1):
            return []
        sizes = []
        for seq in _COMM_SEQS:
            if self.dp > 1:
                plan = ParallelPlan(tp=1, dp=self.dp, ep=self.ep, phase="prefill", seq=seq, micro_batch=1,
                                    global_batch=self.dp, dtype=GRAPH_PRECISION[self.weight_dtype])
            else:
                plan = ParallelPlan(tp=self.tp, phase="prefill", seq=seq, micro_batch=1, global_batch=1,
                                    dtype=GRAPH_PRECISION[self.weight_dtype])
            g = build_graph(self.spec, "prefill", replace(graph_options(plan), kv_dtype=self.kv_dtype))
            blocks = lower_blocks(g, plan)
            found = []
            for name, bl in blocks.items():
                n = self.counts.get(name, 1)
                found += [(node.comm, node.comm_bytes * n, node.axes) for node in bl.forward
                          if node.comm is not None]
            sizes.append(found)
        members = members_per_domain([(1, self.tp)], self.fabric)
        out = []
        (s0, s1) = _COMM_SEQS
        for (kind, b0, _), (_, b1, _) in zip(sizes[0], sizes[1], strict=True):
            slope = (b1 - b0) / (s1 - s0)  # per rank token; a rank has T / dp of the step's tokens
            out.append((kind, b0 - slope * s0, slope / self.dp, members))
        return out

    # --- costs ------------------------------------------------------------------------------
    def _op_time(self, t: _Term, m: int) -> float:
        rows = -(-m // self.dp)  # GEMM rows on one rank
        bytes0 = t.bytes0
        groups = t.gemm_nk[0] if t.gemm_nk else 1
        if t.routed:
            # a step of m tokens touches only the experts some token picked: with balanced routing each
            # expert is missed by all m tokens with probability (1 - top_k / experts)^m, so a fraction
            # `active` of the local experts runs, and only their weights are read (the term's constant
            # bytes are the expert weights); each active expert multiplies m * top_k / experts / active rows
            active = 1.0 - (1.0 - t.routed) ** m if m > 0 else 0.0
            bytes0 *= active
            groups = max(1, round(groups * active))
            rows = max(1, round(m * t.routed / active)) if active > 0 else 1
        gemm = (groups, rows, t.gemm_nk[1], t.gemm_nk[2]) if t.gemm_nk and m > 0 else None
        return self.compute.time_s(t.flops0 + t.flops1 * m, bytes0 + t.bytes1 * m, t.kind, gemm)

    def linear_s(self, tokens: int, n_logits: int) -> tuple[float, float, int]:
        """(compute s, communication s, kernels) of the token-linear ops and collectives; cached by shape."""
        key = (tokens, n_logits)
        hit = self._linear_cache.get(key)
        if hit is not None:
            return hit
        # the body (tokens) and the head (n_logits) are cached apart: steps mix them freely, and the
        # head is added last, so the sum is the same float as computed in one pass
        body = self._body_cache.get(tokens)
        if body is None:
            comp = sum(self._op_time(t, tokens) for t in self._emb_terms)
            kernels = len(self._emb_terms) + len(self._comm)
            for kind, terms in self._layer_terms.items():
                comp += self.counts[kind] * sum(self._op_time(t, tokens) for t in terms)
                kernels += self.counts[kind] * len(terms)
            comm = sum(collective_time_s(kind, b0 + b1 * tokens, members, self.fabric)[0]  # type: ignore[arg-type]
                       for kind, b0, b1, members in self._comm)
            body = self._body_cache[tokens] = (comp, comm, kernels)
        comp, comm, kernels = body
        if n_logits > 0:
            head = self._head_cache.get(n_logits)
            if head is None:
                head = self._head_cache[n_logits] = sum(self._op_time(t, n_logits) for t in self._head_terms)
            comp += head
            kernels += len(self._head_terms)
        if len(self._linear_cache) >= _LINEAR_MEMO_MAX:
            self._linear_cache.clear()
        self._linear_cache[key] = (comp, comm, kernels)
        return comp, comm, kernels

    def attention_s(self, chunk_new: Sequence[float] | np.ndarray, chunk_prefix: Sequence[float] | np.ndarray,
                    decode_ctx: np.ndarray) -> tuple[float, int]:
        """(seconds, kernels) of attention of one step: prefill chunks (new, prefix) and decode contexts."""
        total = 0.0
        kernels = 0
        has_pf, has_dc = len(chunk_new) > 0, len(decode_ctx) > 0
        # one prefill chunk (the common step): its polynomial terms in plain floats, the same
        # operations as the array path (a one-element sum is the element)
        one = len(chunk_new) == 1
        if one:
            new0, prefix0 = float(chunk_new[0]), float(chunk_prefix[0])
            full0, prefix_sum = new0 + prefix0, prefix0
        arrays = None

        def as_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            cn = np.asarray(chunk_new, dtype=np.float64)
            cp = np.asarray(chunk_prefix, dtype=np.float64)
            return cn, cp, cn + cp

        if has_pf and not one:
            arrays = as_arrays()
            prefix_sum = float(_sum(arrays[1]))
        if has_dc:
            gemm = self._decode_gemm(len(decode_ctx), float(_sum(decode_ctx)))
        dp = self.dp
        time_s = self.compute.time_s
        for kind, n in self.counts.items():
            if kind not in self._pf_attn:
                continue
            t = 0.0
            if has_pf:
                for op, ff, fb in self._pf_attn[kind]:
                    if one and isinstance(ff, _PolyFn) and isinstance(fb, _PolyFn):
                        fl = ff.at(full0) - ff.at(prefix0)
                        by = fb.at(new0) + self._kv_tok[kind] * prefix_sum
                    else:
                        cn, cp, full = arrays = arrays or as_arrays()
                        fl = float(_sum(ff(full) - ff(cp)))
                        by = float(_sum(fb(cn))) + self._kv_tok[kind] * prefix_sum
                    t += time_s(fl / dp, by / dp, op)
            if has_dc:
                for op, ff, fb in self._dc_attn[kind]:
                    if isinstance(ff, _PolyFn) and isinstance(fb, _PolyFn):
                        fl, by = _pair_sums(ff, fb, decode_ctx)
                    else:
                        fl, by = float(_sum(ff(decode_ctx))), float(_sum(fb(decode_ctx)))
                    t += time_s(fl / dp, by / dp, op, gemm)
            total += n * t
            kernels += n * (has_pf * len(self._pf_attn[kind]) + has_dc * len(self._dc_attn[kind]))
        return total, kernels

    def _decode_gemm(self, n: int, ctx_sum: float) -> tuple[int, int, int, int] | None:
        """QK^T shape of one rank's decode attention: (requests x query heads, 1, mean context, head dim)."""
        if not self._dec_shape or n == 0:
            return None
        per_rank = max(1, -(-n // self.dp))
        return (per_rank * self._q_heads, 1, max(1, int(round(ctx_sum / n))), self.spec.dim_head)

    def decode_run_s(self, ctx0: np.ndarray, steps: int, overhead_s: float = 0.0,
                     kernel_gap_s: float | None = None) -> np.ndarray:
        """Durations of ``steps`` consecutive decode-only steps of the same requests, whose contexts
        start at ``ctx0`` and grow by one per step: the same costs :meth:`iteration` gives step by
        step (``ComputeModel.time_s`` per attention op and step), with the per-request sums taken in
        closed form from the polynomial attention costs instead of one array pass per step."""
        ctx = np.asarray(ctx0, dtype=np.float64)
        n = len(ctx)
        lin, comm, k1 = self.linear_s(n, n)
        # per step in plain floats (runs are short; the same operations, in the same order, that the
        # array form a * (s2 + 2 * j * s1 + n * j * j) + ... would do element by element)
        xs = [float(x) for x in range(steps)]
        s1, s2 = float(_sum(ctx)), float(_sum(ctx * ctx))
        att = [0.0] * steps
        k2 = 0
        t = self.compute.time_s
        dp = self.dp
        # each step's QK^T shape (what _decode_gemm gives for the step's context sum)
        if self._dec_shape:
            rows, hd = max(1, -(-n // dp)) * self._q_heads, self.spec.dim_head
            shapes: list = [(rows, 1, max(1, int(round((s1 + n * x) / n))), hd) for x in xs]
        else:
            shapes = [None] * steps
        for kind, count in self.counts.items():
            if kind not in self._dc_attn:
                continue
            k2 += count * len(self._dc_attn[kind])
            for op, ff, fb in self._dc_attn[kind]:
                sums = []
                for fn in (ff, fb):
                    if isinstance(fn, _PolyFn):
                        a, b, c = fn.coef
                        sums.append([a * (s2 + 2 * x * s1 + n * x * x) + b * (s1 + n * x) + n * c for x in xs])
                    else:
                        sums.append([float(np.sum(fn(ctx + x))) for x in xs])
                att = [acc + count * t(f / dp, b_ / dp, op, g)
                       for acc, f, b_, g in zip(att, sums[0], sums[1], shapes, strict=True)]
        launch = 0.0 if kernel_gap_s is None else (k1 + k2) * (kernel_gap_s - self.compute.launch_s)
        base = lin + comm + launch + overhead_s
        return np.array([base + x for x in att])

    def iteration(self, chunk_new: Sequence[int] | np.ndarray, chunk_prefix: Sequence[int] | np.ndarray,
                  decode_ctx: Sequence[int] | np.ndarray, n_logits: int, overhead_s: float = 0.0,
                  kernel_gap_s: float | None = None) -> IterationCost:
        """Cost of one step. ``n_logits``: rows that sample a token (decodes + prefills that finish).

        ``kernel_gap_s``: the step replays a CUDA graph, so each kernel costs this gap instead of the
        device's eager launch cost (``ComputeModel.launch_s``)."""
        return IterationCost(*self._iteration(chunk_new, chunk_prefix, decode_ctx, n_logits, overhead_s,
                                              kernel_gap_s))

    def step_s(self, chunk_new: np.ndarray, chunk_prefix: np.ndarray, decode_ctx: np.ndarray, n_logits: int,
               overhead_s: float = 0.0, kernel_gap_s: float | None = None) -> float:
        """``iteration(...).total_s`` without building the breakdown (the scheduler's per-step call)."""
        return self._iteration(chunk_new, chunk_prefix, decode_ctx, n_logits, overhead_s, kernel_gap_s)[0]

    def _iteration(self, chunk_new: Sequence[int] | np.ndarray, chunk_prefix: Sequence[int] | np.ndarray,
                   decode_ctx: Sequence[int] | np.ndarray, n_logits: int, overhead_s: float,
                   kernel_gap_s: float | None) -> tuple[float, float, float, float, float, int]:
        dc = np.asarray(decode_ctx, dtype=np.float64)
        tokens = int(_sum(np.asarray(chunk_new, dtype=np.float64))) if len(chunk_new) != 1 else int(float(chunk_new[0]))
        lin, comm, k1 = self.linear_s(tokens + len(dc), n_logits)
        att, k2 = self.attention_s(chunk_new, chunk_prefix, dc)
        launch = 0.0
        if kernel_gap_s is not None:
            launch = (k1 + k2) * (kernel_gap_s - self.compute.launch_s)
        total = lin + att + comm + launch + overhead_s
        return total, lin, att, comm, overhead_s, k1 + k2

    # --- memory -----------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token occupies on one device of the replica (all layers; with
        attention-DP a token lives on one rank, so the per-device average is that / dp)."""
        return sum(self._kv_tok[k] * n for k, n in self.counts.items() if k in self._kv_tok) / self.dp

    def weight_bytes_per_device(self) -> float:
        """Weight bytes one device holds (TP-sharded dims divided, the rest replicated)."""
        total = 0.0
        for name, blk in self.prefill.blocks().items():
            total += self.counts[name] * sum(self._eval(t.numel, expert=is_expert_weight(t)) for t in blk.weights)
        return total * self._wbytes


def kv_capacity_tokens(predictor: IterationPredictor, hbm_bytes: float, mem_fraction: float,
                       block_tokens: int) -> int:
    """Tokens of KV cache one replica holds: ``mem_fraction`` of HBM minus the weights, in whole blocks."""
    free = hbm_bytes * mem_fraction - predictor.weight_bytes_per_device()
    if free <= 0:
        raise SpecError("model", f"weights ({predictor.weight_bytes_per_device() / 2**30:.1f} GiB per device) "
                        f"do not fit in {mem_fraction:.2f} of {hbm_bytes / 2**30:.0f} GiB; raise --tp")
    blocks = int(free // (predictor.kv_bytes_per_token() * block_tokens))
    return max(0, blocks) * block_tokens


__all__ = ["IterationCost", "IterationPredictor", "WEIGHT_BYTES", "kv_capacity_tokens"]
