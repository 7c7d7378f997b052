"""Time of one COMP node: a roofline with explicit efficiencies, plus a per-kernel launch overhead.

``t = max(flops / (peak * eff_op), tensor_bytes / (hbm_Bps * hbm_efficiency)) + kernel_launch_s``

* ``peak``: for the vector ops of :data:`VECTOR_OPS` (norms, activations, softmax, optimizer
  arithmetic, ...) the device's plain fp32 vector peak (CUDA cores), because those kernels do not
  run on matrix units; for every other op (matmul-like ``einsum``, attention, and any kind not
  listed, so a fused node is never charged at vector speed) the dense peak of the program's
  dtype. Vector ops are nearly always memory-bound, so the choice rarely changes a time.
* ``eff_op``: the device's ``matmul_efficiency`` for matmul-like ops; for fused attention the
  device's ``attention_efficiency`` when the spec has one (FlashAttention kernels reach a lower
  fraction of peak than large GEMMs), else ``matmul_efficiency``; 1.0 for vector ops (their limit
  is the HBM term, whose efficiency is ``hbm_efficiency``).
* ``kernel_launch_s``: the device's fixed per-kernel overhead; one per COMP node (a node is one
  kernel, or one fused group of kernels, in the lowering).

**Fused nodes.** A COMP node may stand for a run of kernels with no communication between them
(:mod:`tensorstage.lower.fuse`): its ``op`` is ``"fused:" + ";".join("<op>,<flops>,<bytes>,<category>")``
over the parts, and its time is the sum of the parts' own times (each with its launch), exactly
what the unfused chain costs. Fusing only cuts the node count (lowering and simulation time).

All three parameters come from :class:`tensorstage.hardware.device.DeviceSpec` with their sources;
nothing here is fitted. A COMP node with ``flops == 0 and tensor_bytes == 0`` costs only the launch.
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``Node.op`` values of element-wise / reduction kernels that run on vector units (graph op kinds).
VECTOR_OPS: frozenset[str] = frozenset(
    {"add", "mul", "unary", "norm", "softmax", "dropout", "rope", "layout", "gather", "cross_entropy",
     "topk", "dispatch", "combine", "elementwise", "optimizer", "adam", "copy"}
)
#: ``Node.op`` values of fused attention kernels (charged at dtype peak x attention efficiency).
ATTENTION_OPS: frozenset[str] = frozenset({"attention", "flash_attention", "sdpa"})


#: ``Node.op`` prefix of a fused node (see module docstring).
FUSED_PREFIX = "fused:"


def fused_op(parts: list[tuple[str, int, int, str]]) -> str:
    """The ``op`` string of a node fusing ``parts`` = ``[(op, flops, tensor_bytes, category), ...]``."""
    for op, _, _, cat in parts:
        if any(ch in op + cat for ch in ",;") or op.startswith(FUSED_PREFIX):
            raise ValueError(f"op {op!r} / category {cat!r} cannot be fused (contains ',' or ';' or is fused)")
    return FUSED_PREFIX + ";".join(f"{op},{int(f)},{int(b)},{cat}" for op, f, b, cat in parts)


def fused_parts(op: str) -> list[tuple[str, int, int, str]] | None:
    """``[(op, flops, tensor_bytes, category), ...]`` of a fused ``op`` string, ``None`` for a plain op."""
    if not op.startswith(FUSED_PREFIX):
        return None
    out = []
    for part in op[len(FUSED_PREFIX):].split(";"):
        name, f, b, cat = part.split(",")
        out.append((name, int(f), int(b), cat))
    return out


@dataclass(frozen=True)
class ComputeModel:
    """The roofline parameters of one device for one compute dtype, all in SI units."""

    tensor_flops: float  # achievable tensor-core FLOP/s = dtype peak x matmul efficiency
    attention_flops: float  # achievable FLOP/s of fused attention kernels
    vector_flops: float  # achievable non-matrix FLOP/s
    hbm_Bps: float  # achievable HBM bytes/s = peak x hbm efficiency
    launch_s: float  # per-node overhead
    peak_flops: float  # dense dtype peak (the MFU/HFU denominator)

    @staticmethod
    def from_device(device: object, dtype: str) -> ComputeModel:
        """Build from a ``DeviceSpec``; unknown/unsupported dtypes raise its ``SpecError``."""
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
        )

    def time_s(self, flops: float, tensor_bytes: float, op: str = "") -> float:
        """Roofline time of one node (see module docstring); a fused node sums its parts."""
        if op.startswith(FUSED_PREFIX):
            total = 0.0
            for name, f, b, _ in fused_parts(op):  # type: ignore[union-attr]
                total += self.time_s(f, b, name)
            return total
        return max(flops / self.rate_flops(op), tensor_bytes / self.hbm_Bps) + self.launch_s

    def rate_flops(self, op: str) -> float:
        """Achievable FLOP/s charged to a node of kind ``op``."""
        if op in VECTOR_OPS:
            return self.vector_flops
        if op in ATTENTION_OPS:
            return self.attention_flops
        return self.tensor_flops
