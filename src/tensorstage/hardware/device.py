"""`DeviceSpec`: one accelerator (one rank), its datasheet peaks and the efficiencies the simulator applies.

Peaks are *dense* (no structured sparsity) datasheet numbers in physical units: FLOP/s (2 per
multiply-add), bytes, decimal GB/s (1 GB/s = 1e9 B/s). Link bandwidths are per GPU *per direction*
(datasheets usually quote NVLink/xGMI bidirectional totals; we halve them and say so in the source).

Every numeric field carries its provenance in ``sources[field]``; the validator refuses a spec that
has a number without a source. The efficiency parameters are not datasheet numbers: each source says
whether it was measured (and on what) or is an assumption (and on what it rests). Sources that are
assumptions start with ``ASSUMPTION`` so a reader, or :meth:`DeviceSpec.assumed_fields`, can find them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tensorstage.errors import SpecError
from tensorstage.hardware._errors import spec_error

#: Data types with a peak-FLOP/s field ``<dtype>_flops`` on :class:`DeviceSpec`.
#: ``fp32`` is plain IEEE fp32 math (CUDA cores / vector or fp32 matrix units, no TF32 rounding).
DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8")

Vendor = Literal["NVIDIA", "AMD", "Google"]

ASSUMPTION_PREFIX = "ASSUMPTION"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceSpec(_Frozen):
    """One accelerator as the simulator sees it: the unit that runs one rank's program.

    A ``None`` peak means the device has no such data path (e.g. fp8 on A100): asking for it is an
    error rather than a silent fallback.
    """

    name: str
    vendor: Vendor
    aliases: tuple[str, ...] = ()
    description: str = ""

    # --- dense peak arithmetic, FLOP/s -----------------------------------------------------------
    fp32_flops: float | None = None
    tf32_flops: float | None = None
    bf16_flops: float
    fp16_flops: float | None = None
    fp8_flops: float | None = None

    # --- memory ---------------------------------------------------------------------------------
    hbm_bytes: int
    """Usable device memory in bytes (datasheet capacity; "80GB" parts hold 80 GiB)."""
    hbm_GBps: float
    """Peak HBM bandwidth, decimal GB/s."""

    # --- links ----------------------------------------------------------------------------------
    scaleup_GBps: float
    """Scale-up (NVLink / Infinity Fabric / ICI) bandwidth per device per direction, all links summed."""
    scaleup_domain: int
    """Devices reachable over the scale-up fabric in the reference system (8 for an HGX board)."""
    scaleout_GBps: float | None = None
    """Typical scale-out NIC bandwidth per device per direction (one 400 Gb/s NIC per GPU = 50 GB/s)."""

    # --- efficiency parameters for the simulator --------------------------------------------------
    matmul_efficiency: float
    """Fraction of dense peak that large, well-shaped GEMMs reach (cuBLAS/hipBLASLt, 8192^3 class).

    It is a *ceiling* for compute kernels, not an MFU: small or skinny GEMMs, attention and
    element-wise kernels get their own costs from the roofline in ``sim``.
    """
    hbm_efficiency: float
    """Fraction of ``hbm_GBps`` a streaming kernel (device-to-device copy) achieves."""
    kernel_launch_s: float
    """Fixed per-kernel overhead in seconds added to every compute node (launch + tail)."""
    sm_count: int | None = None
    """Streaming multiprocessors (NVIDIA) / compute units that GEMM thread-block tiles are scheduled
    on, in waves (:func:`tensorstage.sim.compute.gemm_shape_factor`); ``None``: no shape model."""

    kernel_tables: str | None = None
    """Device preset whose measured kernel tables this device uses (same die, SMs and clocks: e.g.
    H800 -> H100-SXM); ``None``: its own name's tables, if any (:mod:`tensorstage.sim.kernels`)."""

    sources: dict[str, str] = {}  # absent -> the check below lists every field that needs one
    notes: str = ""

    @model_validator(mode="after")
    def _check(self) -> DeviceSpec:
        for field in (*(f"{d}_flops" for d in DTYPES), "hbm_GBps", "scaleup_GBps", "scaleout_GBps"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"{field}: must be > 0")
        if self.hbm_bytes < 1:
            raise ValueError("hbm_bytes: must be >= 1")
        if self.scaleup_domain < 1:
            raise ValueError("scaleup_domain: must be >= 1")
        for field in ("matmul_efficiency", "hbm_efficiency"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"{field}: must be in (0, 1]")
        if self.kernel_launch_s < 0:
            raise ValueError("kernel_launch_s: must be >= 0")
        if self.sm_count is not None and self.sm_count < 1:
            raise ValueError("sm_count: must be >= 1")
        numeric = set(numeric_fields())
        unknown = sorted(set(self.sources) - numeric)
        if unknown:
            raise ValueError(f"sources: keys that are not numeric fields: {unknown}")
        missing = [f for f in numeric_fields() if getattr(self, f) is not None and not self.sources.get(f)]
        if missing:
            raise ValueError(f"sources: every numeric field needs a source; missing: {missing} "
                             "(a hypothetical number: 'ASSUMPTION: <why>')")
        return self

    # --- queries ----------------------------------------------------------------------------------
    def supported_dtypes(self) -> tuple[str, ...]:
        """Data types with a dense peak on this device, in :data:`DTYPES` order."""
        return tuple(d for d in DTYPES if getattr(self, f"{d}_flops") is not None)

    def peak_flops(self, dtype: str) -> float:
        """Dense datasheet peak FLOP/s for ``dtype``; :class:`SpecError` if the device lacks it."""
        if dtype not in DTYPES:
            raise SpecError("dtype", f"unknown dtype {dtype!r}", allowed=DTYPES)
        value = getattr(self, f"{dtype}_flops")
        if value is None:
            raise SpecError(
                "dtype", f"{self.name} has no dense {dtype} peak", allowed=self.supported_dtypes()
            )
        return float(value)

    def achievable_flops(self, dtype: str) -> float:
        """Peak times :attr:`matmul_efficiency`: what the simulator charges large GEMMs against."""
        return self.peak_flops(dtype) * self.matmul_efficiency

    @property
    def hbm_Bps(self) -> float:
        """Peak HBM bandwidth in bytes/s."""
        return self.hbm_GBps * 1e9

    @property
    def achievable_hbm_Bps(self) -> float:
        """Peak HBM bandwidth times :attr:`hbm_efficiency`, bytes/s."""
        return self.hbm_Bps * self.hbm_efficiency

    def assumed_fields(self) -> tuple[str, ...]:
        """Numeric fields whose source is an assumption rather than a datasheet or a measurement."""
        return tuple(f for f, s in self.sources.items() if s.startswith(ASSUMPTION_PREFIX))

    @classmethod
    def parse(cls, data: dict, where: str = "device") -> DeviceSpec:
        """Validate a plain dict (e.g. from YAML), turning pydantic's report into one :class:`SpecError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise spec_error(exc, where) from None


_TEXT_FIELDS = frozenset({"name", "vendor", "aliases", "description", "kernel_tables", "sources", "notes"})


def numeric_fields() -> tuple[str, ...]:
    """Names of the :class:`DeviceSpec` fields that hold numbers (each needs a source), in field order."""
    return tuple(name for name in DeviceSpec.model_fields if name not in _TEXT_FIELDS)
