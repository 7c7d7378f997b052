"""`Machine`: everything the engine needs from a `SystemSpec`, flattened to SI numbers once.

The engine never reads hardware specs directly: :func:`machine_from_system` turns a
:class:`tensorstage.hardware.system.SystemSpec` into a :class:`ComputeModel` (roofline of one
device for one dtype), a :class:`Fabric` (tiers of the network, per-GPU achievable bandwidth and
latency) and two scalars. Tests build a `Machine` by hand with round numbers.

Network mapping (one tier per ASTRA-sim dimension, innermost first):

* tier size = the dimension's ``npus``; per-GPU port bandwidth = ``injection_GBps()`` (all of an
  NPU's links in that dimension: algorithms are assumed to spread over every link, as NCCL/RCCL
  multi-ring and direct algorithms do) x link efficiency; scale-out dimensions are further divided
  by the fabric's ``oversubscription``; latency = ``latency_ns``.
* NVLS (in-switch all-reduce) on the innermost dimension when the system says ``nvls``.

Parameters the hardware spec does not carry yet are explicit here, each an assumption with its
basis (the simulator prefers a field of the same name on the system/device when one appears):

* :data:`LINK_EFFICIENCY` by scope: fraction of link bandwidth NCCL ring collectives reach
  (bus bandwidth / link bandwidth).
* :data:`NVLS_EFFICIENCY`: NVLS all-reduce algorithm bandwidth / link bandwidth.
* :data:`NCCL_RING_BASE_LATENCY_S`: per-collective fixed latency of ring collectives (NCCL).
* :data:`OVERLAP_SLOWDOWN`: fractional slowdown of compute kernels while a communication
  kernel of the same rank runs (they share SMs and HBM bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorstage.sim.collectives import Fabric, Tier
from tensorstage.sim.compute import ComputeModel

#: ASSUMPTION, not measured here: nccl-tests all_reduce bus bandwidth on DGX A100/H100 is commonly
#: reported at ~75-80 % of the NVLink per-direction rate inside a node and ~90 % of the NIC line
#: rate across nodes. Same value for every generation; to be replaced by measured per-system fields.
LINK_EFFICIENCY: dict[str, float] = {"scale-up": 0.80, "scale-out": 0.90}
#: ASSUMPTION: NVLS all-reduce on 8x H100 is reported at ~450-480 GB/s bus bandwidth (= 1.75x
#: algorithm bandwidth) on 450 GB/s links, i.e. algorithm bandwidth ~0.6 of the link rate.
NVLS_EFFICIENCY: float = 0.60
#: NCCL's tuning model (``src/graph/tuning.cc``, ``baseLat[RING][SIMPLE]`` = 8.4 us, the same in the
#: 2020-21 releases the validated Megatron runs used and in v2.28): fixed latency of one ring
#: collective with the Simple protocol, charged once per collective on top of the per-step hop
#: latency (``hwLat``, the tiers' ``latency_ns``). Tree/Simple had 0 in those older releases, so
#: the tree algorithm does not carry it.
#: A software constant, the same for every system; a system field ``ring_base_latency_s`` overrides.
NCCL_RING_BASE_LATENCY_S: float = 8.4e-6
#: ASSUMPTION: GEMMs overlapped with NCCL kernels run ~10 % slower (SM and HBM sharing; the order
#: reported by overlap studies such as Wang et al. ASPLOS23 and Rashidi et al. ISCA22); not fitted.
OVERLAP_SLOWDOWN: float = 0.10
#: Link contention between concurrent communications of a rank on its scale-out port (``sim/engine.py``):
#: off by default until validated (docs/astra-sim.md says what it changes).
LINK_CONTENTION_DEFAULT: bool = False


@dataclass(frozen=True)
class Machine:
    """What the engine runs on: device roofline, network tiers, memory capacity, overlap factor."""

    compute: ComputeModel
    fabric: Fabric
    hbm_capacity_bytes: int
    overlap_slowdown: float = OVERLAP_SLOWDOWN
    dtype: str = "bf16"
    name: str = ""
    link_contention: bool = False


def fabric_from_system(system: object) -> Fabric:
    """Tiers of a ``SystemSpec``'s network dimensions (see module docstring)."""
    tiers = []
    over = getattr(getattr(system, "scaleout", None), "oversubscription", 1.0) or 1.0
    nvls = bool(getattr(system, "nvls", False))
    for i, dim in enumerate(system.network):  # type: ignore[attr-defined]
        eff = getattr(dim, "efficiency", None) or LINK_EFFICIENCY[dim.scope]
        inj_Bps = dim.injection_GBps() * 1e9 if dim.npus > 1 else dim.bandwidth_GBps * 1e9
        bw = inj_Bps * eff / (over if dim.scope == "scale-out" else 1.0)
        nvls_bw = inj_Bps * (getattr(system, "nvls_efficiency", None) or NVLS_EFFICIENCY) if nvls and i == 0 else 0.0
        tiers.append(Tier(dim.name, dim.npus, bw, dim.latency_ns * 1e-9, nvls_bw,
                          switched=str(getattr(dim, "topology", "Switch")) == "Switch"))
    base = getattr(system, "ring_base_latency_s", None)
    return Fabric(tuple(tiers), NCCL_RING_BASE_LATENCY_S if base is None else float(base))


def machine_from_system(system: object, dtype: str = "bf16", kernel_tables: bool | None = None) -> Machine:
    """A :class:`Machine` for ``system`` computing in ``dtype`` (``SpecError`` if the device lacks it).

    ``kernel_tables``: use the device's measured kernel tables (:mod:`tensorstage.sim.kernels`);
    ``None`` takes :data:`tensorstage.sim.compute.KERNEL_TABLES_DEFAULT`."""
    device = system.device  # type: ignore[attr-defined]
    slow = getattr(system, "overlap_slowdown", None)
    return Machine(
        compute=ComputeModel.from_device(device, dtype, kernel_tables=kernel_tables),
        fabric=fabric_from_system(system),
        hbm_capacity_bytes=int(device.hbm_bytes),
        overlap_slowdown=OVERLAP_SLOWDOWN if slow is None else float(slow),
        dtype=dtype,
        name=str(getattr(system, "name", "")),
        link_contention=LINK_CONTENTION_DEFAULT,
    )
