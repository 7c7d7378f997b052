"""Write a :class:`SystemSpec`'s network as ASTRA-sim's analytical-backend ``network.yml``.

ASTRA-sim 2.x reads four parallel lists, innermost dimension first::

    topology: [ Switch, Switch ]
    npus_count: [ 8, 128 ]
    bandwidth: [ 419.095, 46.566 ]   # GB/s per link per direction, where ASTRA-sim's GB is 2**30 bytes
    latency: [ 500.0, 2000.0 ]       # ns per link

Unit trap: upstream astra-network-analytical converts with ``bw_GBps * 2**30 / 1e9`` bytes per ns
(``common/NetworkFunction.cc``: "1 GB is 2^30 B"), while tensorstage stores decimal GB/s
(1e9 B/s, as datasheets quote). We therefore write ``GBps * 1e9 / 2**30`` so ASTRA-sim moves the
same bytes per second as our spec says. Dimensions of one NPU carry no traffic and are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorstage.fileio import write_text_atomic
from tensorstage.hardware.system import SystemSpec

ASTRA_GB_BYTES = 2**30  # ASTRA-sim analytical backend's "GB"


def to_astra_network(spec: SystemSpec) -> dict[str, list[Any]]:
    """The ``network.yml`` mapping for ASTRA-sim's analytical backend (bandwidth in ASTRA-sim's GiB-based GB/s)."""
    dims = [d for d in spec.network if d.npus > 1] or [spec.network[0]]
    return {
        "topology": [d.topology for d in dims],
        "npus_count": [d.npus for d in dims],
        "bandwidth": [round(d.bandwidth_GBps * 1e9 / ASTRA_GB_BYTES, 6) for d in dims],
        "latency": [float(d.latency_ns) for d in dims],
    }


def astra_network_yml(spec: SystemSpec) -> str:
    """``network.yml`` text in ASTRA-sim's own flow style, with a provenance comment."""
    net = to_astra_network(spec)
    lines = [
        f"# tensorstage system {spec.name}: {spec.num_gpus} NPUs ({spec.device.name})",
        "# bandwidth in ASTRA-sim GB/s (1 GB = 2^30 B), per link per direction; latency in ns per link",
    ]
    for key, values in net.items():
        lines.append(f"{key}: [ {', '.join(str(v) for v in values)} ]")
    return "\n".join(lines) + "\n"


def write_astra_network(spec: SystemSpec, path: str | Path) -> Path:
    """Write :func:`astra_network_yml` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    write_text_atomic(path, astra_network_yml(spec))
    return path
