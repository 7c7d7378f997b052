"""ASTRA-sim input files that describe the machine our simulator runs on: network, system, memory.

Why: a trace only says *what* runs; ASTRA-sim also needs the network (``network.yml``), the system
layer (``system.json``: collective algorithms, chunking, roofline) and a remote-memory file. Written
from the same numbers our simulator uses (:func:`tensorstage.sim.machine.fabric_from_system` and
the device's :class:`~tensorstage.sim.compute.ComputeModel`), so a side-by-side run compares the
two simulators and not two different machines.

How each number is chosen (ASTRA-sim analytical backend, congestion-unaware, and its system layer):

* ``network.yml`` lists only dimensions with more than one NPU, innermost first.
  ``bandwidth`` = one *link*, one direction, our achievable rate (datasheet x link efficiency,
  scale-out divided by the fabric's oversubscription): the per-GPU port bandwidth of our tier
  divided by the dimension's links per NPU (1 for ``Switch``, 2 for ``Ring``, ``npus - 1`` for
  ``FullyConnected``), in ASTRA's GB/s where 1 GB = 2^30 bytes (``bw_GBps_to_Bpns``).
  ``latency`` = per *link* in ns, as ASTRA charges it: a message through a ``Switch`` crosses two
  links (NPU -> switch -> NPU) and pays the latency twice, so we write half our per-message
  alpha there; ``Ring`` and ``FullyConnected`` neighbours are one link apart.
* ``system.json``: collectives one dimension after another (``localBWAware``: reduce-scatter
  inward, all-reduce on the last dimension, all-gather back: our ``hierarchical`` algorithm);
  per dimension ``ring`` on ``Switch`` and ``Ring`` dimensions (one link per NPU, as our ring) and
  ``direct`` on ``FullyConnected`` ones (every peer link at once, as our model spreads traffic over
  all links); all-to-all ``direct1`` on a ``Switch`` (one peer at a time, so the NPU's single link
  is not counted ``n - 1`` times by a backend without congestion) and ``direct`` on a
  ``FullyConnected`` dimension. ``preferred-dataset-splits`` = ``active-chunks-per-dimension`` =
  1: a collective is one chunk, as in our alpha-beta formulas (more splits add per-chunk
  latency). ASTRA-sim applies the per-dimension lists only to collectives over all ranks; on a
  network of several dimensions any smaller group runs one ring over its members
  (``CommunicatorGroup::get_collective_plan``). ``peak-perf`` (TFLOP/s) = dtype peak x matmul efficiency and ``local-mem-bw``
  (decimal GB/s) = HBM x HBM efficiency: the achievable rates of our compute model.
* ``local-mem-bw`` has a second use in ASTRA-sim: every reduce step of a ring (reduce-scatter,
  all-reduce) waits ``3 * step_bytes / local-mem-bw`` (two reads and a write, ``PacketBundle::call``)
  *after* its message arrives and before the next step is sent. NCCL fuses that reduction into the
  copy and pipelines it slice by slice behind the link (HBM is ~8x faster than an NVLink port), so
  nccl-tests measure the same bus bandwidth for reduce-scatter as for all-gather and our model
  charges none. With one chunk per collective ASTRA cannot pipeline it, so the replay-mode file
  writes :data:`ASTRA_HIDDEN_REDUCTION_GBPS` there (every reduce step rounds to 0 ns); replay mode
  never uses ``local-mem-bw`` for anything else (compute takes the trace's durations). The roofline
  file keeps HBM, which its compute roofline needs, and so still charges the reduction.
* Two system files: ``system.json`` (replay mode: each COMP node takes its ``duration_micros``,
  which ``generate --system`` fills from our compute model) and ``system_roofline.json``
  (ASTRA's own roofline over ``num_ops`` / ``tensor_size``; one peak for every op and no kernel
  launch cost, so it differs from ours on vector ops, attention and small kernels).

Known differences that no file can remove are listed in ``docs/astra-sim.md``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorstage.fileio import write_text_atomic
from tensorstage.hardware.system import SystemSpec
from tensorstage.sim.compute import ComputeModel
from tensorstage.sim.machine import fabric_from_system

#: ASTRA-sim analytical backend's "GB" (``common/NetworkFunction.cpp``: "1 GB is 2^30 B")
ASTRA_GB_BYTES = 2**30
#: the binary of ASTRA-sim's congestion-unaware analytical backend
ASTRA_BINARY = "AstraSim_Analytical_Congestion_Unaware"
#: ASTRA-sim's own default ``endpoint-delay`` (ns per message at the end points). Not 0: with 0 its
#: analytical event queue schedules an event at the current time and aborts (``EventQueue::proceed``
#: assertion, seen on ZeRO-3 traces); 10 ns is far below any per-message latency we model.
ASTRA_ENDPOINT_DELAY_NS = 10
#: ``local-mem-bw`` of the replay-mode ``system.json`` (GB/s): ASTRA's serial per-step reduction
#: charge ``3 * bytes / local-mem-bw`` rounds to 0 ns for any step under 333 MB (module docstring)
ASTRA_HIDDEN_REDUCTION_GBPS = 1e9
NETWORK_FILE = "network.yml"
SYSTEM_FILE = "system.json"
SYSTEM_ROOFLINE_FILE = "system_roofline.json"
REMOTE_MEMORY_FILE = "remote_memory.json"
COMMANDS_FILE = "astra_commands.sh"

#: per-dimension collective implementation by building block (module docstring)
_COLLECTIVE_IMPL = {"Switch": "ring", "Ring": "ring", "FullyConnected": "direct"}
_ALL_TO_ALL_IMPL = {"Switch": "direct1", "Ring": "direct1", "FullyConnected": "direct"}


@dataclass(frozen=True)
class AstraConfig:
    """The contents of ASTRA-sim's network, system (replay and roofline) and remote-memory files."""

    system_name: str
    npus: int
    network: dict[str, list[Any]]
    system: dict[str, Any]
    system_roofline: dict[str, Any]
    remote_memory: dict[str, Any] = field(default_factory=lambda: {"memory-type": "NO_MEMORY_EXPANSION"})


def astra_config(spec: SystemSpec, dtype: str = "bf16") -> AstraConfig:
    """ASTRA-sim inputs for ``spec`` (already sized to the run's ranks) computing in ``dtype``.

    Bad dtypes raise the device's one-line ``SpecError``.
    """
    fabric = fabric_from_system(spec)
    compute = ComputeModel.from_device(spec.device, dtype)
    dims = [(d, t) for d, t in zip(spec.network, fabric.tiers, strict=True) if d.npus > 1]
    if not dims:  # one NPU: ASTRA still wants one dimension
        dims = [(spec.network[0], fabric.tiers[0])]
    network: dict[str, list[Any]] = {"topology": [], "npus_count": [], "bandwidth": [], "latency": []}
    for dim, tier in dims:
        links = max(1, dim.links_per_npu())
        network["topology"].append(dim.topology)
        network["npus_count"].append(dim.npus)
        network["bandwidth"].append(round(tier.bw_Bps / links / ASTRA_GB_BYTES, 6))
        hops = 2 if dim.topology == "Switch" else 1
        network["latency"].append(round(tier.latency_s * 1e9 / hops, 6))
    coll = [_COLLECTIVE_IMPL[d.topology] for d, _ in dims]
    system: dict[str, Any] = {
        "scheduling-policy": "FIFO",
        "endpoint-delay": ASTRA_ENDPOINT_DELAY_NS,
        "active-chunks-per-dimension": 1,
        "preferred-dataset-splits": 1,
        "all-reduce-implementation": coll,
        "all-gather-implementation": coll,
        "reduce-scatter-implementation": coll,
        "all-to-all-implementation": [_ALL_TO_ALL_IMPL[d.topology] for d, _ in dims],
        "collective-optimization": "localBWAware",
        "local-mem-bw": round(compute.hbm_Bps / 1e9, 6),
        "boost-mode": 0,
        "roofline-enabled": 0,
        "peak-perf": round(compute.tensor_flops / 1e12, 6),
    }
    replay = {**system, "local-mem-bw": ASTRA_HIDDEN_REDUCTION_GBPS}
    return AstraConfig(spec.name, spec.num_gpus, network, replay, {**system, "roofline-enabled": 1})


def network_yml_text(cfg: AstraConfig) -> str:
    """``network.yml`` in ASTRA-sim's own flow style, with a provenance comment."""
    lines = [
        f"# tensorstage system {cfg.system_name}: {cfg.npus} NPUs",
        "# bandwidth: one link, one direction, achievable (datasheet x efficiency), GB/s with 1 GB = 2^30 B",
        "# latency: ns per link; a Switch message crosses two links, so this is half the per-message latency",
    ]
    for key, values in cfg.network.items():
        lines.append(f"{key}: [ {', '.join(str(v) for v in values)} ]")
    return "\n".join(lines) + "\n"


def _json_text(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2) + "\n"


def astra_command(config_dir: str, workload: str, comm_groups: str, roofline: bool = False,
                  binary: str = ASTRA_BINARY) -> str:
    """The ASTRA-sim command line (one line, shell-quoted) for a trace ``workload`` prefix.

    ``workload`` is the path prefix of the rank files (``DIR/trace`` for ``DIR/trace.<rank>.et``);
    ``comm_groups`` the communicator-group JSON written beside them.
    """
    cfg = Path(config_dir)
    args = [
        binary,
        f"--workload-configuration={workload}",
        f"--comm-group-configuration={comm_groups}",
        f"--system-configuration={cfg / (SYSTEM_ROOFLINE_FILE if roofline else SYSTEM_FILE)}",
        f"--remote-memory-configuration={cfg / REMOTE_MEMORY_FILE}",
        f"--network-configuration={cfg / NETWORK_FILE}",
    ]
    return " ".join(shlex.quote(a) for a in args)


def write_astra_config(cfg: AstraConfig, out_dir: str | Path, workload: str, comm_groups: str
                       ) -> dict[str, Path]:
    """Write the four input files and a commands file into ``out_dir``; returns them by role.

    The commands file holds the replay and the roofline command lines for ``workload`` and
    ``comm_groups`` (paths as the caller gave them, so the file is the same on every machine).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = str(out)
    commands = (
        "# ASTRA-sim runs of this trace (congestion-unaware analytical backend); see docs/astra-sim.md\n"
        "# replay mode: COMP nodes take their duration_micros (generate --system writes them)\n"
        f"{astra_command(shown, workload, comm_groups, roofline=False)}\n"
        "# roofline mode: ASTRA's roofline over num_ops / tensor_size\n"
        f"{astra_command(shown, workload, comm_groups, roofline=True)}\n"
    )
    files = {
        "network": write_text_atomic(out / NETWORK_FILE, network_yml_text(cfg)),
        "system": write_text_atomic(out / SYSTEM_FILE, _json_text(cfg.system)),
        "system_roofline": write_text_atomic(out / SYSTEM_ROOFLINE_FILE, _json_text(cfg.system_roofline)),
        "remote_memory": write_text_atomic(out / REMOTE_MEMORY_FILE, _json_text(cfg.remote_memory)),
        "commands": write_text_atomic(out / COMMANDS_FILE, commands),
    }
    return files
