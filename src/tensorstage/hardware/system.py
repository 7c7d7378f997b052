"""`SystemSpec`: a cluster of identical devices and the network between them, for the simulator.

The network is described in ASTRA-sim's vocabulary so it maps one-to-one onto its analytical
backend's ``network.yml``: an ordered list of dimensions, innermost first, each a building block
(``Ring``, ``FullyConnected`` or ``Switch``) with an NPU count, a link bandwidth and a link latency.
Total ranks = product of the dimensions' ``npus``. Units and semantics, per dimension:

- ``bandwidth_GBps``: one link, one direction, decimal GB/s (1e9 B/s), as ASTRA-sim's per-dim link
  bandwidth: a ``Switch`` NPU has one link of this bandwidth to the switch, a ``Ring`` NPU two
  (one per neighbour), a ``FullyConnected`` NPU one to each of the ``npus - 1`` peers. (Upstream
  ASTRA-sim's analytical backend has converted GB/s with 2**30 in some versions: exporters must
  say which convention they write.)
- ``latency_ns``: per-link (per-hop) latency in nanoseconds.

Beside the dimensions, ``scaleout`` describes the physical scale-out fabric (rail-optimized or plain
fat-tree, NICs, oversubscription) that the dimension list abstracts, and ``nvls`` says whether the
scale-up switch can reduce in-network (NVLink SHARP), which changes the best all-reduce algorithm.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tensorstage.errors import SpecError
from tensorstage.fileio import write_text_atomic
from tensorstage.hardware._errors import spec_error
from tensorstage.hardware.device import DeviceSpec
from tensorstage.hardware.presets import (
    load_device,
    looks_like_path,
    read_packaged_yaml,
    read_yaml,
    unknown_name_error,
)
from tensorstage.hardware.torus import torus_slice
from tensorstage.limits import MAX_WORLD

TopologyKind = Literal["Ring", "FullyConnected", "Switch"]
Scope = Literal["scale-up", "scale-out"]
FabricKind = Literal["rail-optimized", "fat-tree"]

SYSTEMS_FILE = "systems.yaml"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NetworkDim(_Frozen):
    """One dimension of the hierarchical network (one ASTRA-sim ``topology`` entry)."""

    name: str
    scope: Scope
    topology: TopologyKind
    npus: int
    bandwidth_GBps: float
    latency_ns: float

    @model_validator(mode="after")
    def _check(self) -> NetworkDim:
        if self.npus < 1:
            raise ValueError("npus: must be >= 1")
        if not self.bandwidth_GBps > 0:
            raise ValueError("bandwidth_GBps: must be > 0")
        if self.latency_ns < 0:
            raise ValueError("latency_ns: must be >= 0")
        return self

    def links_per_npu(self) -> int:
        """Outgoing links of one NPU in this dimension, as ASTRA-sim's building blocks wire them."""
        if self.npus == 1:
            return 0
        if self.topology == "Switch":
            return 1
        if self.topology == "Ring":
            return 1 if self.npus == 2 else 2
        return self.npus - 1

    def injection_GBps(self) -> float:
        """Bandwidth one NPU can push into this dimension per direction, all its links together."""
        return self.links_per_npu() * self.bandwidth_GBps


class ScaleOutFabric(_Frozen):
    """The physical scale-out network that the outer dimensions stand for.

    ``rail-optimized``: NIC *i* of every node sits on leaf switch group *i* (one rail per local GPU
    index), as in NVIDIA DGX SuperPODs, so same-index GPUs talk through one leaf hop.
    ``oversubscription``: leaf down-link to up-link bandwidth ratio (1.0 = non-blocking); the
    simulator divides cross-leaf bandwidth by it.
    """

    kind: FabricKind
    nic_Gbps: float
    nics_per_node: int
    oversubscription: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> ScaleOutFabric:
        if not self.nic_Gbps > 0:
            raise ValueError("nic_Gbps: must be > 0")
        if self.nics_per_node < 1:
            raise ValueError("nics_per_node: must be >= 1")
        if self.oversubscription < 1:
            raise ValueError("oversubscription: must be >= 1 (1 = non-blocking)")
        return self

    def node_GBps(self) -> float:
        """Scale-out bandwidth of one node per direction, GB/s (line rate, Gb/s / 8)."""
        return self.nic_Gbps * self.nics_per_node / 8.0


class SystemSpec(_Frozen):
    """Devices, nodes and the multi-dimensional network of one cluster."""

    name: str
    description: str = ""
    device: DeviceSpec
    gpus_per_node: int
    network: tuple[NetworkDim, ...]
    scaleout: ScaleOutFabric | None = None
    nvls: bool = False
    sources: dict[str, str] = {}  # absent -> the check below lists every field that needs one

    @model_validator(mode="after")
    def _check(self) -> SystemSpec:
        if self.gpus_per_node < 1:
            raise ValueError("gpus_per_node: must be >= 1")
        if not self.network:
            raise ValueError("network: needs at least one dimension")
        names = [d.name for d in self.network]
        if len(set(names)) != len(names):
            raise ValueError(f"network: dimension names must be unique, got {names}")
        scopes = [d.scope for d in self.network]
        if "scale-up" not in scopes or scopes != sorted(scopes, key=lambda s: s == "scale-out"):
            raise ValueError("network: scale-up dimensions first (at least one), then scale-out ones")
        up = math.prod(d.npus for d in self.network if d.scope == "scale-up")
        out = math.prod(d.npus for d in self.network if d.scope == "scale-out")
        if up > self.gpus_per_node or (out > 1 and up != self.gpus_per_node):
            raise ValueError(
                f"network: scale-up dimensions span {up} NPUs but a node has gpus_per_node={self.gpus_per_node}"
            )
        if out > 1 and self.scaleout is None:
            raise ValueError("scaleout: required when a scale-out dimension has more than one node")
        required = ["gpus_per_node"]
        for d in self.network:
            required += [f"network.{d.name}.bandwidth_GBps", f"network.{d.name}.latency_ns"]
        if self.scaleout is not None:
            required += [f"scaleout.{f}" for f in ("nic_Gbps", "nics_per_node", "oversubscription")]
        missing = [k for k in required if not self.sources.get(k)]
        if missing:
            raise ValueError(f"sources: every numeric field needs a source; missing: {missing} "
                             "(a hypothetical number: 'ASSUMPTION: <why>')")
        known = set(required) | {f"network.{d.name}.npus" for d in self.network} | {"nvls"}
        unknown = sorted(set(self.sources) - known)
        if unknown:
            raise ValueError(f"sources: keys that name no field: {unknown}")
        return self

    # --- queries ----------------------------------------------------------------------------------
    @property
    def num_gpus(self) -> int:
        """Total ranks: the product of all dimensions' NPU counts."""
        return math.prod(d.npus for d in self.network)

    @property
    def num_nodes(self) -> int:
        """Nodes in use (a partial node counts as one)."""
        return max(1, math.ceil(self.num_gpus / self.gpus_per_node))

    def with_num_gpus(self, num_gpus: int) -> SystemSpec:
        """The same system resized to ``num_gpus`` ranks by changing the outermost dimension.

        Up to one node, the single scale-up dimension shrinks (and scale-out dimensions become 1),
        or a torus scale-up network (all ``Ring``, e.g. TPU ICI) takes its most balanced slice;
        beyond, ``num_gpus`` must fill whole nodes and the outermost scale-out dimension takes the
        node count divided by the other scale-out dimensions.
        """
        if num_gpus < 1:
            raise SpecError("num_gpus", "must be >= 1")
        if num_gpus > MAX_WORLD:
            raise SpecError("num_gpus", f"{num_gpus:,} GPUs; at most {MAX_WORLD:,} are supported (tensorstage.limits)")
        dims = [d.model_dump() for d in self.network]
        ups = [i for i, d in enumerate(dims) if d["scope"] == "scale-up"]
        outs = [i for i, d in enumerate(dims) if d["scope"] == "scale-out"]
        if len(ups) == 1:  # a resized copy may have shrunk it: start from a full node again
            dims[ups[0]]["npus"] = self.gpus_per_node
        if num_gpus <= self.gpus_per_node:
            if num_gpus != self.gpus_per_node and len(ups) != 1:
                shape = self._torus_slice(ups, num_gpus)
                if shape is None:
                    raise SpecError(
                        "num_gpus", f"{self.name} has a multi-dimensional scale-up network; use whole nodes"
                    )
                for i, n in zip(ups, shape, strict=True):
                    dims[i]["npus"] = n
            dims[ups[0]]["npus"] = num_gpus if len(ups) == 1 else dims[ups[0]]["npus"]
            for i in outs:
                dims[i]["npus"] = 1
        else:
            if num_gpus % self.gpus_per_node or not outs:
                allowed = f"multiples of gpus_per_node={self.gpus_per_node}" if outs else "up to one node"
                raise SpecError("num_gpus", f"{num_gpus} does not fit {self.name} ({allowed})")
            nodes = num_gpus // self.gpus_per_node
            inner = math.prod(dims[i]["npus"] for i in outs[:-1])
            if nodes % inner:
                raise SpecError(
                    "num_gpus", f"{nodes} nodes is not a multiple of the inner scale-out size {inner}"
                )
            dims[outs[-1]]["npus"] = nodes // inner
        data = self.model_dump()
        data["network"] = dims
        resized = SystemSpec.parse(data, where="system")
        if resized.num_gpus != num_gpus:  # a torus slice resized again: its full rings are unknown
            raise SpecError("num_gpus", f"{num_gpus} does not fit this {self.num_gpus}-chip slice of "
                            f"{self.name}; resize the preset itself")
        return resized

    def _torus_slice(self, ups: list[int], num_gpus: int) -> tuple[int, ...] | None:
        """Ring sizes of a ``num_gpus``-chip slice when the scale-up network is a torus (all
        ``Ring`` dimensions, e.g. TPU ICI): :func:`tensorstage.hardware.torus.torus_slice`, each
        ring at most its size in this spec. ``None`` for other networks or impossible sizes."""
        if any(self.network[i].topology != "Ring" for i in ups):
            return None
        return torus_slice(tuple(self.network[i].npus for i in ups), num_gpus)

    def to_dict(self) -> dict:
        """Plain data with the device inline, so a written file stands alone (round-trips)."""
        return self.model_dump(mode="json")

    @classmethod
    def parse(cls, data: dict, where: str = "system") -> SystemSpec:
        """Validate a plain dict; ``device`` may be a preset name or an inline device mapping."""
        if not isinstance(data, dict):
            raise SpecError(where, "must be a mapping of system fields")
        data = dict(data)
        if isinstance(data.get("device"), str):
            data["device"] = load_device(data["device"], field=f"{where}.device")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise spec_error(exc, where) from None


@cache
def _system_table() -> dict[str, SystemSpec]:
    data = read_packaged_yaml(SYSTEMS_FILE)
    table: dict[str, SystemSpec] = {}
    for i, entry in enumerate(data["systems"]):
        spec = SystemSpec.parse(entry, where=f"systems[{i}]")
        table[spec.name] = spec
    return table


def system_names() -> list[str]:
    """Preset system names in file order."""
    return list(_system_table())


def all_systems() -> list[SystemSpec]:
    """All preset systems (at their default sizes) in file order."""
    return list(_system_table().values())


def load_system(name_or_yaml_path: str | Path, num_gpus: int | None = None) -> SystemSpec:
    """A preset system by name (case-insensitive) or a system YAML file, optionally resized.

    Unknown names and invalid fields raise a one-line :class:`SpecError` naming the field.
    """
    if looks_like_path(name_or_yaml_path):
        spec = SystemSpec.parse(read_yaml(Path(name_or_yaml_path), "system"), where="system")
    else:
        name_or_yaml_path = str(name_or_yaml_path)
        lookup = {n.lower(): n for n in system_names()}
        key = lookup.get(name_or_yaml_path.lower())
        if key is None:
            raise unknown_name_error("system", "system", name_or_yaml_path, system_names())
        spec = _system_table()[key]
    return spec if num_gpus is None else spec.with_num_gpus(num_gpus)


def write_system_yaml(spec: SystemSpec, path: str | Path) -> Path:
    """Write ``spec`` as a standalone YAML file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True, width=110)
    return write_text_atomic(path, text)
