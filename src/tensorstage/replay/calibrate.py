"""``calibrate_network``: a system file whose network dimensions carry the fitted alpha-beta.

The base system (a preset or YAML) gives the devices, node size and dimension layout; dimension
``i`` (innermost first) takes the fit of link tier ``i`` of the replay (dimensions without a
fitted tier keep their values). The simulator turns a dimension into a port bandwidth of
``bandwidth_GBps x links_per_npu x LINK_EFFICIENCY[scope]`` (:mod:`tensorstage.sim.machine`), so
the file stores ``fitted / (links_per_npu x efficiency)``: the simulator then charges exactly the
measured bandwidth, and ``latency_ns`` is the fitted per-message alpha. Every changed field's
``sources`` entry says it was measured, from which result file, on which network, with the fit's
residual, so the file stays loadable (every number has a source) and honest about its origin.
"""

from __future__ import annotations

from pathlib import Path

from tensorstage.errors import SpecError
from tensorstage.hardware.system import SystemSpec, load_system
from tensorstage.replay.fit import TierFit
from tensorstage.sim.machine import LINK_EFFICIENCY


def calibrated_system(base: SystemSpec, fits: list[TierFit], origin: str, network: str) -> SystemSpec:
    """``base`` with the fitted tiers written into its network dimensions (module docstring)."""
    if not fits:
        raise SpecError("results", "no tier could be fitted")
    data = base.to_dict()
    sources = dict(data.get("sources") or {})
    dims = data["network"]
    for f in fits:
        if f.tier >= len(dims):
            raise SpecError("system", f"{base.name} has {len(dims)} network dimension(s); the results fit "
                            f"tier {f.tier} (use a system with more dimensions)")
        dim = base.network[f.tier]
        links = max(1, dim.links_per_npu())
        eff = LINK_EFFICIENCY[dim.scope]
        dims[f.tier]["bandwidth_GBps"] = f.bandwidth_Bps / 1e9 / (links * eff)
        dims[f.tier]["latency_ns"] = f.latency_s * 1e9
        basis = (f"measured: tensorstage calibrate-network, alpha-beta fit of {f.cases} cases of {origin} "
                 f"(gloo on {network}, tier {f.tier} '{f.name}', relative RMS residual {f.rel_rms_pct:.1f} %)")
        sources[f"network.{dim.name}.bandwidth_GBps"] = (
            f"{basis}: {f.bandwidth_Bps / 1e9:.6g} GB/s achieved per port, stored divided by "
            f"links_per_npu={links} x LINK_EFFICIENCY[{dim.scope}]={eff} so the simulator charges the measured rate")
        sources[f"network.{dim.name}.latency_ns"] = f"{basis}: per-message alpha"
    data["name"] = f"{base.name}-calibrated"
    data["description"] = f"{base.description or base.name}; network calibrated from {origin}"
    data["sources"] = sources
    return SystemSpec.parse(data, where="calibrated system")


def load_base_system(name_or_path: str | Path) -> SystemSpec:
    """The base system (preset name or YAML)."""
    return load_system(name_or_path)
