"""Time of one COMP node: a roofline with explicit efficiencies, plus a per-kernel launch overhead.

``t = max(flops / (peak * eff_op), tensor_bytes / (hbm_Bps * hbm_efficiency)) + kernel_launch_s``

* ``peak``: for the vector ops of :data:`VECTOR_OPS` (norms, activations, softmax, optimizer
  arithmetic, ...) the device's plain fp32 vector peak (CUDA cores), because those kernels do not
  run on matrix units; for every other op (matmul-like ``einsum``, attention, and any kind not
  listed, so a fused node is never charged at vector speed) the dense peak of the program's
  dtype. Vector ops are nearly always memory-bound, so the choice rarely changes a time.
* ``eff_op``: the device's ``matmul_efficiency`` for matmul-like ops (times the GEMM shape factor
  below when the node carries its GEMM shape and the model is on); for fused attention the
  device's ``attention_efficiency`` when the spec has one (FlashAttention kernels reach a lower
  fraction of peak than large GEMMs), else ``matmul_efficiency``; 1.0 for vector ops (their limit
  is the HBM term, whose efficiency is ``hbm_efficiency``).
* ``kernel_launch_s``: the device's fixed per-kernel overhead; one per COMP node (a node is one
  kernel, or one fused group of kernels, in the lowering).

**GEMM shape efficiency** (:func:`gemm_shape_factor`; NVIDIA Deep Learning Performance Guide,
"Matrix Multiplication Background", sections 2.3 "Typical tile dimensions in cuBLAS and performance"
and 3 "Dimension quantization effects"). cuBLAS computes C (m x n, per batch entry) in thread-block
tiles ``tm x tn`` (256x128 and 128x256 most efficient, then 128x128, 256x64/64x256, 128x64/64x128,
64x64 least efficient: :data:`GEMM_TILES`), one tile per SM at a time, in *waves* of ``sm_count``
tiles. A GEMM of ``batch`` x ``ceil(m/tm) x ceil(n/tn)`` tiles therefore occupies
``waves = ceil(tiles / sm_count)`` full waves of padded tiles, and its useful fraction is
``batch*m*n / (waves * sm_count * tm * tn)`` (tile quantization and wave quantization together).
Smaller tiles quantize less but reuse each loaded operand over fewer multiply-adds (``tm*tn/(tm+tn)``
per element); we take a tile's main-loop rate as full down to 128x128 and proportional to that
reuse below it (:func:`tile_reuse`: 128x64 -> 0.67, 64x64 -> 0.5; an ASSUMPTION standing in for the
guide's qualitative ranking). Tile choice: the candidate with the highest utilisation x reuse (the
cuBLAS heuristic picks per shape; on ties the larger tile, listed first). When a GEMM has fewer
tiles than SMs, cuBLAS splits K (split-K) to fill the machine: up to ``sm_count // tiles`` K-slices
of at least :data:`SPLIT_K_MIN` each. Small-K factor: each tile pays a pipeline prologue and an
epilogue of about :data:`GEMM_K_OVERHEAD` = 64 K-elements (two 32-deep K-steps; ASSUMPTION), so
``k_slice / (k_slice + 64)``. The factor multiplies ``matmul_efficiency`` *relative to the shape the
efficiency was measured on* (:data:`REFERENCE_GEMM`, 8192^3: the device's ``matmul_efficiency`` is
that GEMM's measured fraction of peak), so an 8192^3 GEMM keeps exactly the measured rate and no new
fitted parameter enters: ``eff = matmul_efficiency * f(b, m, n, k) / f(1, 8192, 8192, 8192)``. It
needs the device's ``sm_count`` and the node's ``gemm`` = ``(batch, m, n, k)``
(:class:`tensorstage.schedule.program.Node`); nodes without a shape, devices without an SM count and
``ComputeModel.gemm_shapes=False`` keep the plain ceiling. The default is
:data:`GEMM_SHAPE_MODEL_DEFAULT` (see docs/calibration.md for the measured effect on validation).

**Fused nodes.** A COMP node may stand for a run of kernels with no communication between them
(:mod:`tensorstage.lower.fuse`): its ``op`` is ``"fused:" + ";".join("<op>,<flops>,<bytes>,<category>[,<gemm>]")``
over the parts (``<gemm>`` = ``b.m.n.k`` for a part with a GEMM shape), and its time is the sum of the parts' own times (each with its launch), exactly
what the unfused chain costs. Fusing only cuts the node count (lowering and simulation time).

All three parameters come from :class:`tensorstage.hardware.device.DeviceSpec` with their sources;
nothing here is fitted. A COMP node with ``flops == 0 and tensor_bytes == 0`` costs only the launch.

**Measured kernel tables** (:mod:`tensorstage.sim.kernels`; ``ComputeModel.from_device(...,
kernel_tables=True)``, default :data:`KERNEL_TABLES_DEFAULT`). Where the device has committed tables,
a matmul node with a GEMM shape takes the measured GEMM time of its dtype (fp8: the measured FP8
GEMM with its input cast, as Transformer Engine runs it), and a fused attention node whose ``gemm`` carries its
QK^T shape ``(batch*heads, q_len, kv_len, head_dim)`` takes the measured attention time:
forward, backward (``category == "bwd_input"``) or decode (``q_len == 1``), always in BF16 (TE runs
attention in BF16 under FP8 recipes). The K/V head count (GQA group) comes from the node's bytes
(forward: q and out are query-sized, k and v K/V-sized; backward twice each; bf16), the same way
decode recovers it. The fraction of query-key pairs computed comes from the node's
FLOPs (``flops / (b*h*sq*skv*(4*d + 5))`` forward, ``/ (10*d + 10)`` backward: the graph's attention
FLOPs plus its softmax vector FLOPs), so a causal kernel counted with the ``full`` FLOP convention is
charged as a full one. A matmul whose node FLOPs exceed its shape's ``2*b*m*n*k`` (MoE load factor)
is charged in proportion, and a GEMM is never faster than streaming its node's bytes at the achievable
HBM rate (a batched GEMM, e.g. MoE experts, reads every group's own weights; the table times one
weight shared by all rows). Every other node, and every node of a device or dtype without a table,
keeps the roofline above; each node still pays ``kernel_launch_s`` (the tables time the kernel
itself, back to back, not the gap between framework-launched kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import ceil

from tensorstage.sim.kernels import KernelTables, load_tables

#: ``Node.op`` values of element-wise / reduction kernels that run on vector units (graph op kinds).
VECTOR_OPS: frozenset[str] = frozenset(
    {"add", "mul", "unary", "glu", "norm", "softmax", "dropout", "rope", "layout", "gather", "cross_entropy",
     "topk", "dispatch", "combine", "elementwise", "optimizer", "adam", "copy"}
)
#: ``Node.op`` values of fused attention kernels (charged at dtype peak x attention efficiency).
ATTENTION_OPS: frozenset[str] = frozenset({"attention", "flash_attention", "sdpa"})


#: ``Node.op`` of an MoE expert GEMM (a grouped GEMM over the local experts): a matmul whose measured
#: kernel time carries the grouped-GEMM efficiency of :meth:`KernelTables.grouped_gemm_efficiency`
GROUPED_OP = "grouped_matmul"


def grouped_dims(gemm: Gemm, category: str = "") -> tuple[int, int]:
    """``(tokens per expert, width)`` of an expert GEMM ``(experts, m, n, k)``: the tokens are the rows
    ``m`` of a forward or input-gradient GEMM and the contraction ``k`` of a weight gradient; the width
    is the narrower of the other two dimensions."""
    _, m, n, k = gemm
    if category == "bwd_weight":
        return k, min(m, n)
    return m, min(n, k)


#: ``Node.op`` prefix of a fused node (see module docstring).
FUSED_PREFIX = "fused:"

#: GEMM shape ``(batch, m, n, k)`` of a COMP node (``None``: not a GEMM, or unknown)
Gemm = tuple[int, int, int, int]
#: cuBLAS thread-block tiles (tm, tn), most efficient first (Matrix Multiplication Background, 2.3)
GEMM_TILES: tuple[tuple[int, int], ...] = (
    (256, 128), (128, 256), (128, 128), (256, 64), (64, 256), (128, 64), (64, 128), (64, 64)
)
#: K-elements of per-tile prologue + epilogue (ASSUMPTION: two 32-deep K-steps)
GEMM_K_OVERHEAD = 64
#: smallest K-slice split-K makes
SPLIT_K_MIN = 256
#: the shape ``DeviceSpec.matmul_efficiency`` is measured on (batch, m, n, k)
REFERENCE_GEMM: Gemm = (1, 8192, 8192, 8192)
#: whether :meth:`ComputeModel.from_device` turns the shape model on (docs/calibration.md, ablation)
GEMM_SHAPE_MODEL_DEFAULT = True
#: whether :meth:`ComputeModel.from_device` uses the measured kernel tables (docs/calibration.md)
KERNEL_TABLES_DEFAULT = True
#: dtypes whose GEMMs the tables time (others keep the roofline)
_TABLE_DTYPES = ("bf16", "fp16", "fp8")


def tile_reuse(tm: int, tn: int) -> float:
    """Main-loop rate of a ``tm x tn`` tile relative to 128x128: operand reuse ``tm*tn/(tm+tn)``, capped at 1."""
    return min(1.0, (tm * tn / (tm + tn)) / 64.0)


@lru_cache(maxsize=65536)
def gemm_shape_factor(batch: int, m: int, n: int, k: int, sm_count: int) -> float:
    """Fraction of the tile main-loop rate a ``batch x (m x k) @ (k x n)`` GEMM keeps on ``sm_count`` SMs:
    tile + wave quantization of the best tile (:data:`GEMM_TILES`, with split-K when there are fewer
    tiles than SMs) times the small-K factor ``k_slice / (k_slice + GEMM_K_OVERHEAD)`` (module docstring)."""
    if min(batch, m, n, k) < 1:
        return 1.0
    best = 0.0
    for tm, tn in GEMM_TILES:
        tiles = batch * ceil(m / tm) * ceil(n / tn)
        split = 1
        if tiles < sm_count:
            split = max(1, min(sm_count // tiles, k // SPLIT_K_MIN))
        ctas = tiles * split
        waves = ceil(ctas / sm_count)
        util = (batch * m * n * split) / (waves * sm_count * tm * tn)
        kslice = k / split
        f = util * tile_reuse(tm, tn) * kslice / (kslice + GEMM_K_OVERHEAD)
        if f > best * (1 + 1e-12):
            best = f
    return best


def format_gemm(gemm: Gemm | None) -> str:
    """``b.m.n.k`` (the fused-part field), ``""`` for none."""
    return "" if gemm is None else ".".join(str(int(x)) for x in gemm)


def parse_gemm(text: str) -> Gemm | None:
    """Inverse of :func:`format_gemm`."""
    if not text:
        return None
    b, m, n, k = (int(x) for x in text.split("."))
    return (b, m, n, k)


def fused_op(parts: list[tuple]) -> str:
    """The ``op`` string of a node fusing ``parts`` = ``[(op, flops, tensor_bytes, category[, gemm]), ...]``."""
    out = []
    for p in parts:
        op, f, b, cat = p[:4]
        gemm = p[4] if len(p) > 4 else None
        if any(ch in op + cat for ch in ",;") or op.startswith(FUSED_PREFIX):
            raise ValueError(f"op {op!r} / category {cat!r} cannot be fused (contains ',' or ';' or is fused)")
        text = f"{op},{int(f)},{int(b)},{cat}"
        out.append(text + ("," + format_gemm(gemm) if gemm is not None else ""))
    return FUSED_PREFIX + ";".join(out)


def fused_parts(op: str) -> list[tuple[str, int, int, str, Gemm | None]] | None:
    """``[(op, flops, tensor_bytes, category, gemm), ...]`` of a fused ``op`` string, ``None`` for a plain op."""
    if not op.startswith(FUSED_PREFIX):
        return None
    out = []
    for part in op[len(FUSED_PREFIX):].split(";"):
        fields = part.split(",")
        name, f, b, cat = fields[:4]
        out.append((name, int(f), int(b), cat, parse_gemm(fields[4]) if len(fields) > 4 else None))
    return out


def anchored(tables: KernelTables, device: object) -> KernelTables:
    """``tables`` with compute-bound kernel times put on the device's *sustained* GEMM level.

    The tables are short-run microbenchmarks (kernels timed back to back for milliseconds); in a
    training run the GPU sits at its power limit and clocks lower. The device preset's
    ``matmul_efficiency`` is the sustained large-GEMM fraction of peak (its source says how it was
    obtained: for A100, the best measured GEMM rate x NVIDIA's sustained HPL clock / boost clock).
    The tables keep what they measure well: how the rate changes with shape, dtype and attention
    length relative to the reference GEMM (8192^3 bf16); the level is the preset's:
    ``factor = table_efficiency(8192^3) / matmul_efficiency`` multiplies GEMM and attention times
    (decode attention is HBM-bound and keeps its measured time). No new fitted parameter enters.
    """
    peak = device.peak_flops("bf16")  # type: ignore[attr-defined]
    eff = tables.reference_gemm_efficiency(peak)
    sustained = float(getattr(device, "matmul_efficiency", 0.0) or 0.0)
    if eff is None or sustained <= 0:
        return tables
    return tables.sustained(eff / sustained)


@dataclass(frozen=True)
class ComputeModel:
    """The roofline parameters of one device for one compute dtype, all in SI units."""

    tensor_flops: float  # achievable tensor-core FLOP/s = dtype peak x matmul efficiency
    attention_flops: float  # achievable FLOP/s of fused attention kernels
    vector_flops: float  # achievable non-matrix FLOP/s
    hbm_Bps: float  # achievable HBM bytes/s = peak x hbm efficiency
    launch_s: float  # per-node overhead
    peak_flops: float  # dense dtype peak (the MFU/HFU denominator)
    sm_count: int = 0  # SMs the GEMM shape model schedules tiles on (0: shape model off)
    gemm_shapes: bool = False  # apply gemm_shape_factor to nodes that carry a GEMM shape
    kernels: KernelTables | None = field(default=None, compare=False)  # measured kernel tables
    dtype: str = "bf16"  # the compute dtype (which GEMM table the kernels answer from)

    @staticmethod
    def from_device(device: object, dtype: str, gemm_shapes: bool | None = None,
                    kernel_tables: bool | KernelTables | None = None) -> ComputeModel:
        """Build from a ``DeviceSpec``; unknown/unsupported dtypes raise its ``SpecError``.

        ``gemm_shapes``: GEMM shape efficiency on (needs the device's ``sm_count``); ``None`` takes
        :data:`GEMM_SHAPE_MODEL_DEFAULT`. ``kernel_tables``: ``True`` uses the committed measured
        tables of the device (by preset name; none committed: the roofline stays), a
        :class:`KernelTables` uses those, ``False`` none, ``None`` takes :data:`KERNEL_TABLES_DEFAULT`."""
        if kernel_tables is None:
            kernel_tables = KERNEL_TABLES_DEFAULT
        tables = kernel_tables if isinstance(kernel_tables, KernelTables) else (
            load_tables(str(getattr(device, "kernel_tables", None) or getattr(device, "name", "")))
            if kernel_tables else None)
        if tables is not None and not isinstance(kernel_tables, KernelTables):
            tables = anchored(tables, device)
        peak = device.peak_flops(dtype)  # type: ignore[attr-defined]
        vector = getattr(device, "fp32_flops", None) or peak
        attn_eff = getattr(device, "attention_efficiency", None) or device.matmul_efficiency  # type: ignore[attr-defined]
        return ComputeModel(
            tensor_flops=peak * device.matmul_efficiency,  # type: ignore[attr-defined]
            attention_flops=peak * attn_eff,
            vector_flops=float(vector),
            hbm_Bps=device.hbm_GBps * 1e9 * device.hbm_efficiency,  # type: ignore[attr-defined]
            launch_s=float(device.kernel_launch_s),  # type: ignore[attr-defined]
            peak_flops=peak,
            sm_count=int(getattr(device, "sm_count", None) or 0),
            gemm_shapes=GEMM_SHAPE_MODEL_DEFAULT if gemm_shapes is None else bool(gemm_shapes),
            kernels=tables,
            dtype=dtype,
        )

    def time_s(self, flops: float, tensor_bytes: float, op: str = "", gemm: Gemm | None = None,
               category: str = "") -> float:
        """Time of one node (see module docstring); a fused node sums its parts."""
        if op.startswith(FUSED_PREFIX):
            total = 0.0
            for name, f, b, cat, g in fused_parts(op):  # type: ignore[union-attr]
                total += self.time_s(f, b, name, g, cat)
            return total
        if self.kernels is not None and gemm is not None:
            t = self.kernel_time_s(flops, tensor_bytes, op, gemm, category)
            if t is not None:
                return t + self.launch_s
        return max(flops / self.rate_flops(op, gemm), tensor_bytes / self.hbm_Bps) + self.launch_s

    def kernel_time_s(self, flops: float, tensor_bytes: float, op: str, gemm: Gemm,
                      category: str = "") -> float | None:
        """Measured-table time of a GEMM or fused-attention node (no launch), ``None`` without a table."""
        kt = self.kernels
        if kt is None or op in VECTOR_OPS:
            return None
        b, m, n, k = gemm
        if min(b, m, n, k) < 1:
            return None
        if op in ATTENTION_OPS:
            bwd = category == "bwd_input"
            if m == 1 and not bwd:  # decode: one query per sequence reads the whole K/V cache
                kv_heads_b = max(1, min(b, round(tensor_bytes / (4.0 * n * k))))
                return kt.decode_attention_s(1, b, kv_heads_b, n, k)
            per_pair = (10.0 * k + 10.0) if bwd else (4.0 * k + 5.0)
            work = min(1.0, flops / (b * m * n * per_pair)) if flops > 0 else 0.5
            # K/V heads from the node's bytes (bf16): forward reads q, k, v and writes out (+ fp32 lse);
            # backward reads dO, q, k, v, out and writes dq, dk, dv: 2 or 4 query-sized and K/V-sized
            # tensors each
            per = 4.0 if bwd else 2.0
            kv_b = (tensor_bytes - 2.0 * per * b * m * k - 4.0 * b * m) / (2.0 * per * n * k)
            kv_heads = max(1, min(b, round(kv_b))) if kv_b >= 1 else b
            attn = kt.attention_bwd_s if bwd else kt.attention_fwd_s
            return attn(1, b, m, n, k, work=work, kv_heads=kv_heads)
        if self.dtype not in _TABLE_DTYPES:
            return None
        t = kt.gemm_s(b, m, n, k, self.dtype)
        if t is None:
            return None
        shape_flops = 2.0 * b * m * n * k
        # a batched (grouped) GEMM reads every group's own operands: never faster than its bytes
        t = max(t * max(1.0, flops / shape_flops), tensor_bytes / self.hbm_Bps)
        if op == GROUPED_OP:
            tokens, width = grouped_dims(gemm, category)
            eff = kt.grouped_gemm_efficiency(tokens, width, self.dtype)
            if eff:
                t /= eff
        return t

    def rate_flops(self, op: str, gemm: Gemm | None = None) -> float:
        """Achievable FLOP/s charged to a node of kind ``op`` (with GEMM shape ``gemm``, if known)."""
        if op in VECTOR_OPS:
            return self.vector_flops
        if op in ATTENTION_OPS:
            return self.attention_flops
        if gemm is not None and self.gemm_shapes and self.sm_count > 0:
            return self.tensor_flops * self.shape_scale(gemm)
        return self.tensor_flops

    def shape_scale(self, gemm: Gemm) -> float:
        """``gemm_shape_factor(gemm) / gemm_shape_factor(REFERENCE_GEMM)`` on this device's SMs, at
        most 1: the measured ``matmul_efficiency`` is a ceiling (the reference GEMM runs near the best
        rate any shape reaches; a shape the factor scores above it is not credited beyond it)."""
        ref = gemm_shape_factor(*REFERENCE_GEMM, self.sm_count)
        return min(1.0, gemm_shape_factor(*gemm, self.sm_count) / ref)
