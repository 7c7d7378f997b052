"""Kernel times from measured tables: GEMM, fused attention (forward, backward, decode) per device and dtype.

The tables (``tensorstage/hardware/kernels/<device>.json``, one per device preset name) are written
by ``scripts/calibrate_kernels.py`` from the measured kernel latencies that the Apache-2.0 package
``aiconfigurator-core`` ships (NVIDIA; TensorRT-LLM ``torch_flow`` GEMMs and decode attention,
vLLM's FlashAttention forks for prefill attention, all timed on the device). Each table stores an *achieved efficiency* surface, not times: the fraction of a
reference peak (recorded in the table, so a later change of the preset does not move the kernel
times) that the kernel reached, on a log2-spaced grid, fitted by least squares to the measured
points with held-out points left out (``docs/calibration.md``, "Measured kernel model"). A query
interpolates ``log(efficiency)`` multilinearly in ``log2`` of the shape (clamped at the grid edge:
beyond the largest measured shape the efficiency stays at its edge value), so the time between two
measured shapes moves as a power law, which is how both the latency-bound (small) and the
throughput-bound (large) regimes scale.

* **GEMM** ``gemm_s(batch, m, n, k, dtype)``: ``2*b*m*n*k / (ref_flops * eff(b*m, n, k) * q)``; ``q``
  is the tile quantization of the table (``tile128``: ``m / (128*ceil(m/128))`` times the same for
  ``n``, what a 128x128 output tile wastes on a ragged edge; the script keeps it only where it
  lowers the held-out error; on the current data it does not, so ``q = 1``). A batched GEMM (MoE
  experts, materialized attention scores) is charged as one grouped GEMM of ``b*m`` rows with the
  per-group tile quantization of ``m``; the compute model floors it by its bytes (every group
  reads its own weights).
* **Attention forward** ``attention_fwd_s``: measured causal prefill kernels (FlashAttention-2 on
  A100, FlashAttention-3 on Hopper, TensorRT-LLM's FMHA on Blackwell) give
  ``eff(b*heads, seq, heads/kv_heads)`` per head dimension (FlashAttention-3 packs a query group per
  K/V head, so GQA runs faster than MHA at the same FLOPs), with ``flops = 4*b*h*sq*skv*d*work``
  (``work`` = fraction of query-key pairs computed, 1/2 causal).
* **Attention backward** ``attention_bwd_s``: not measured in the tables. FlashAttention-2 (Dao,
  arXiv:2307.08691, introduction and sections 3.1.2, 4.1) does 5 matmuls in the backward against 2
  in the forward (2.5x the FLOPs) and reaches up to 63 % of A100 peak in the backward against up to
  73 % in the forward; so ``t_bwd = 2.5 * (0.73 / 0.63) * t_fwd`` (:data:`ATTN_BWD_FLOP_RATIO`,
  :data:`ATTN_BWD_EFF_RATIO`).
* **Decode attention** ``decode_attention_s``: one query token per sequence against ``kv_len``
  cached keys; memory-bound, so the table stores the fraction of peak HBM bandwidth reached on the
  K/V bytes, ``eff(b*kv_heads, kv_len, heads/kv_heads)`` per head dimension (the query-group size
  matters: a group of 8 query heads per K/V head does 8x the math on the same bytes).

* **MoE expert GEMMs** (``grouped_gemm_efficiency``): a grouped GEMM of many small experts runs
  below the dense table's rate for the same total shape (per-expert tails, narrow expert widths).
  TensorRT-LLM's CUTLASS fused MoE layer latencies (gated SwiGLU and non-gated; bf16 and FP8;
  balanced routing; tokens x experts x EP x TP sweeps) are divided by what this model charges for the
  layer's parts: the two grouped GEMMs on the dense table (floored by their bytes) plus the
  permutation, activation and un-permutation kernels at the HBM rate and a launch each. What is
  left after the element-wise kernels is the grouped GEMMs' relative efficiency,
  ``eff(tokens per expert, width)`` with ``width`` each GEMM's narrower non-token dimension
  (``min(2f, h)`` for the gated up-projection, ``min(h, f)`` for the down-projection, ``f`` the
  expert width per TP rank). Expert GEMM nodes (op ``grouped_matmul``) divide their dense time by it.

FP8 GEMMs use the measured FP8 (per-tensor scaled) table. Those latencies already hold the cast
of the ``m x k`` bf16 input to fp8: the collector times TensorRT-LLM's ``Linear`` with
``QuantAlgo.FP8`` on a bf16 input, whose forward quantizes the input before the FP8 GEMM
(aiconfigurator ``collector/trtllm/collect_gemm.py``), which is the per-GEMM work Transformer
Engine does too (its amax is taken in the same cast kernel; the ``k x n`` weight is cast once per
step and reused across micro-batches, TE's ``is_first_microbatch``). So no cast is added here;
this is why small FP8 GEMMs measure slower than BF16. Attention stays BF16, as Transformer
Engine's FP8 recipes run it by default. A device or dtype without a table returns ``None``
from every query and the caller (:class:`tensorstage.sim.compute.ComputeModel`) keeps its roofline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from math import ceil, exp, log, log2

#: FlashAttention-2: backward does 5 matmuls of the forward's 2 per query-key block (Dao 2023, 3.1.2)
ATTN_BWD_FLOP_RATIO = 2.5
#: FlashAttention-2 on A100: forward up to 73 %, backward up to 63 % of peak (Dao 2023, 4.1)
ATTN_BWD_EFF_RATIO = 0.63 / 0.73
#: dtypes that run on the bf16 tables (same tensor-core rate)
BF16_LIKE = ("bf16", "fp16")
#: output tile edge of the ``tile128`` quantization
TILE = 128
#: most memoized points per surface
MEMO_MAX = 1 << 16


@dataclass(frozen=True)
class Surface:
    """An efficiency surface: ``values`` (flattened, C order) on ``axes`` (log2 node coordinates)."""

    axes: tuple[tuple[float, ...], ...]
    values: tuple[float, ...]
    # memo of evaluated points: callers (the serving predictor, the engine) ask the same shapes
    # many times; bounded (cleared when full) so a long run cannot grow it without limit
    _memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    _prep: list = field(default_factory=list, compare=False, hash=False, repr=False)  # see _prepared

    @staticmethod
    def from_json(d: dict) -> Surface:
        axes = tuple(tuple(log2(v) for v in a) for a in d["axes"])
        return Surface(axes, tuple(float(v) for v in d["eff"]))

    def __call__(self, *x: float) -> float:
        """Efficiency at log2 coordinates ``x`` (multilinear in log efficiency, clamped to the grid)."""
        got = self._memo.get(x)
        if got is not None:
            return got
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        got = self._memo[x] = self._eval(x)
        return got

    def _eval(self, x: tuple[float, ...]) -> float:
        logv, strides = self._prepared()
        idx = [_bracket(ax, xi) for xi, ax in zip(x, self.axes, strict=True)]
        if len(idx) == 3:  # the tables' surfaces: the loop below unrolled (same products, same order)
            (i0, t0), (i1, t1), (i2, t2) = idx
            s0, s1, s2 = strides
            base = i0 * s0 + i1 * s1 + i2 * s2
            acc = 0.0
            for w2, o2 in ((1.0 - t2, 0), (t2, s2)):
                for w1, o1 in ((1.0 - t1, 0), (t1, s1)):
                    for w0, o0 in ((1.0 - t0, 0), (t0, s0)):
                        w = w0 * w1 * w2
                        if w:
                            acc += w * logv[base + o0 + o1 + o2]
            return exp(acc)
        acc = 0.0
        for corner in range(1 << len(idx)):
            w = 1.0
            flat = 0
            for d, (i, t) in enumerate(idx):
                hi = (corner >> d) & 1
                w *= t if hi else 1.0 - t
                flat += (i + hi) * strides[d]
            if w:
                acc += w * logv[flat]
        return exp(acc)

    def _prepared(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """log of every node value and the C-order strides, computed once per surface."""
        if self._prep:
            return self._prep[0]
        strides: list[int] = []
        s = 1
        for ax in reversed(self.axes):
            strides.append(s)
            s *= len(ax)
        strides.reverse()
        got = (tuple(log(v) for v in self.values), tuple(strides))
        self._prep.append(got)
        return got


def _bracket(ax: tuple[float, ...], x: float) -> tuple[int, float]:
    """Lower node index and weight of the upper node for ``x`` on axis ``ax`` (clamped)."""
    if len(ax) == 1 or x <= ax[0]:
        return 0, 0.0
    if x >= ax[-1]:
        return len(ax) - 2, 1.0
    lo, hi = 0, len(ax) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ax[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo, (x - ax[lo]) / (ax[lo + 1] - ax[lo])


def tile_quantization(m: int, n: int) -> float:
    """Useful fraction of the ``TILE x TILE`` output tiles covering an ``m x n`` output."""
    return (m / (TILE * ceil(m / TILE))) * (n / (TILE * ceil(n / TILE)))


@lru_cache(maxsize=1024)
def _nearest(keys: tuple[int, ...], x: int) -> int:
    """The key nearest ``x`` in log2 (ties: the smaller); memoized, callers ask the same few."""
    return min(keys, key=lambda k: (abs(log2(k) - log2(max(1, x))), k))


class KernelTables:
    """The measured kernel model of one device (see module docstring); ``None`` where it has no table."""

    def __init__(self, data: dict, scale: float = 1.0, compute_scale: float = 1.0) -> None:
        self.device: str = data["device"]
        self.data = data
        self._scale = scale  # multiplies every time (tests use it to show the held-out check can fail)
        # multiplies compute-bound times only (GEMM, attention): the sustained-clock anchor, see
        # :meth:`sustained`; decode attention is HBM-bound and keeps the measured time
        self._compute_scale = compute_scale
        self._gemm = {dt: (Surface.from_json(t), t["quantization"], float(t["ref_flops"]))
                      for dt, t in data.get("gemm", {}).items()}
        self._attn = {int(hd): Surface.from_json(t) for hd, t in data.get("attention_fwd", {}).get("head_dim", {}).items()}
        self._attn_ref = float(data.get("attention_fwd", {}).get("ref_flops", 0.0))
        self._dec = {int(hd): Surface.from_json(t) for hd, t in data.get("decode_attention", {}).get("head_dim", {}).items()}
        self._dec_ref = float(data.get("decode_attention", {}).get("ref_Bps", 0.0))
        self._dec_memo: dict[tuple, float] = {}  # decode_attention_s by its arguments (bounded)
        self._moe = {dt: Surface.from_json(t) for dt, t in data.get("moe_gemm", {}).items()}

    def gemm_dtypes(self) -> tuple[str, ...]:
        return tuple(sorted(self._gemm))

    def _gemm_table(self, dtype: str) -> tuple[Surface, str, float] | None:
        if dtype in BF16_LIKE:
            return self._gemm.get("bf16")
        return self._gemm.get(dtype)

    def gemm_s(self, batch: int, m: int, n: int, k: int, dtype: str = "bf16") -> float | None:
        """Time of ``batch`` GEMMs ``(m x k) @ (k x n)`` in ``dtype`` (fp8: with the input cast, as
        measured), or ``None`` without a table."""
        table = self._gemm_table(dtype)
        if table is None or min(batch, m, n, k) < 1:
            return None
        surf, quant, ref = table
        rows = batch * m
        eff = surf(log2(rows), log2(n), log2(k))
        if quant == "tile128":
            eff *= tile_quantization(m, n)  # per group: each of the batch GEMMs pads its own tiles
        return 2.0 * batch * m * n * k / (ref * eff) * self._scale * self._compute_scale

    def attention_fwd_s(self, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                        causal: bool = True, work: float | None = None, kv_heads: int | None = None
                        ) -> float | None:
        """Fused attention forward (BF16). ``work``: fraction of the ``q_len x kv_len`` pairs computed
        (default 1/2 causal, 1 otherwise); ``kv_heads``: K/V heads (default ``heads``, no GQA)."""
        if not self._attn or min(batch, heads, q_len, kv_len, head_dim) < 1:
            return None
        hd = _nearest(tuple(self._attn), head_dim)
        frac = (0.5 if causal else 1.0) if work is None else work
        flops = 4.0 * batch * heads * q_len * kv_len * head_dim * frac
        group = max(1.0, heads / kv_heads) if kv_heads else 1.0
        eff = self._attn[hd](log2(batch * heads), log2(q_len), log2(group))
        return flops / (self._attn_ref * eff) * self._scale * self._compute_scale

    def attention_bwd_s(self, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                        causal: bool = True, work: float | None = None, kv_heads: int | None = None
                        ) -> float | None:
        """Fused attention backward: forward time x 2.5 FLOPs x (0.73 / 0.63) efficiency (module docstring)."""
        fwd = self.attention_fwd_s(batch, heads, q_len, kv_len, head_dim, causal, work, kv_heads)
        return None if fwd is None else fwd * ATTN_BWD_FLOP_RATIO / ATTN_BWD_EFF_RATIO

    def decode_attention_s(self, batch: int, heads: int, kv_heads: int, kv_len: int, head_dim: int,
                           kv_bytes_per_element: int = 2) -> float | None:
        """One decode step's attention over ``kv_len`` cached tokens (K and V read once)."""
        key = (batch, heads, kv_heads, kv_len, head_dim, kv_bytes_per_element)
        got = self._dec_memo.get(key)  # a serving run asks the same decode shapes many times
        if got is not None:
            return got
        if not self._dec or min(batch, heads, kv_heads, kv_len, head_dim) < 1:
            return None
        hd = _nearest(tuple(self._dec), head_dim)
        kv_bytes = 2.0 * batch * kv_heads * kv_len * head_dim * kv_bytes_per_element
        eff = self._dec[hd](log2(batch * kv_heads), log2(kv_len), log2(max(1.0, heads / kv_heads)))
        if len(self._dec_memo) >= MEMO_MAX:
            self._dec_memo.clear()
        got = self._dec_memo[key] = kv_bytes / (self._dec_ref * eff) * self._scale
        return got

    def grouped_gemm_efficiency(self, tokens_per_expert: float, width: float, dtype: str = "bf16") -> float | None:
        """Efficiency of an MoE expert GEMM relative to this device's dense GEMM time for the same
        shape (``moe_gemm`` surface; ``None`` without one): measured fused MoE layers divided by the
        dense-table model of their parts (module docstring). ``tokens_per_expert``: rows each local
        expert multiplies; ``width``: the GEMM's narrower non-token dimension."""
        surf = self._moe.get("bf16" if dtype in BF16_LIKE else dtype)
        if surf is None or tokens_per_expert <= 0 or width < 1:
            return None
        return surf(log2(max(1.0, tokens_per_expert)), log2(width))

    def scaled(self, factor: float) -> KernelTables:
        """The same tables with every time multiplied by ``factor``."""
        return KernelTables(self.data, self._scale * factor, self._compute_scale)

    def sustained(self, factor: float) -> KernelTables:
        """The same tables with compute-bound (GEMM, attention) times multiplied by ``factor``."""
        return KernelTables(self.data, self._scale, self._compute_scale * factor)

    def reference_gemm_efficiency(self, peak_flops: float) -> float | None:
        """Measured fraction of ``peak_flops`` of the bf16 reference GEMM (8192^3), as tabulated."""
        t = self.gemm_s(1, 8192, 8192, 8192, "bf16")
        return None if t is None else 2.0 * 8192**3 / (t / self._compute_scale) / peak_flops


#: package folder of the committed tables
TABLE_PACKAGE = "tensorstage.hardware.kernels"


@lru_cache(maxsize=32)
def load_tables(device_name: str) -> KernelTables | None:
    """The committed tables of device preset ``device_name``, ``None`` when there are none."""
    try:
        text = resources.files(TABLE_PACKAGE).joinpath(f"{device_name}.json").read_text()
    except (FileNotFoundError, OSError, ModuleNotFoundError):
        return None
    return KernelTables(json.loads(text))


def available_devices() -> tuple[str, ...]:
    """Device preset names that have committed kernel tables."""
    root = resources.files(TABLE_PACKAGE)
    return tuple(sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json")))
