"""From a candidate configuration to what the simulator runs: a plan, a system and a model.

A :class:`Task` is small plain data (names and numbers) so it pickles to a process-pool worker or
a Ray task; the worker resolves the model and builds the system itself (both are cached).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorstage.parallel.plan import ParallelPlan


@dataclass(frozen=True)
class Task:
    """One configuration to evaluate: model and system names, GPU count, plan keys, system changes."""

    model: str
    system: str
    gpus: int
    plan: dict[str, Any]
    network: tuple[tuple[str, str, Any], ...] = ()  # (dimension, attribute, value)
    device: str | None = None
    key: str = field(default="", compare=False)

    def system_key(self) -> tuple:
        return (self.system, self.gpus, self.network, self.device)


def config_key(cfg: Mapping[str, Any]) -> str:
    """A canonical text key of a configuration (sorted JSON): the study's identity of a trial."""
    return json.dumps({k: cfg[k] for k in sorted(cfg)}, sort_keys=True, default=str)


def make_task(model: str, system: str, gpus: int, fixed: Mapping[str, Any], cfg: Mapping[str, Any]) -> Task:
    """Split ``cfg`` into plan keys, ``<dim>.<attr>`` network changes and the device; names that
    are none of these (intermediate derived values) are kept out of the plan."""
    plan = dict(fixed)
    net = []
    device = None
    for name, value in cfg.items():
        if name in ParallelPlan.model_fields:
            plan[name] = value
        elif "." in name:
            dim, _, attr = name.partition(".")
            net.append((dim, attr, value))
        elif name == "device":
            device = str(value)
    return Task(model, system, gpus, plan, tuple(sorted(net)), device, config_key(cfg))


@functools.lru_cache(maxsize=64)
def build_system(system: str, gpus: int, network: tuple[tuple[str, str, Any], ...] = (),
                 device: str | None = None) -> Any:
    """The system preset (or YAML) with the task's network and device changes, sized to ``gpus``.

    Changing the scale-up dimension's ``npus`` changes ``gpus_per_node`` with it (a node is one
    scale-up domain in these presets)."""
    from tensorstage.hardware import load_system
    from tensorstage.hardware.system import SystemSpec

    base = load_system(system)
    if not network and device is None:
        return base.with_num_gpus(gpus)
    data = base.model_dump()
    sources = data.setdefault("sources", {})
    searched = "set by the design-space search (tensorstage explore): a what-if, not the preset's cited value"
    if device is not None:
        data["device"] = device
    dims = {d["name"]: d for d in data["network"]}
    for dim, attr, value in network:
        dims[dim][attr] = value
        if f"network.{dim}.{attr}" in sources or attr in ("bandwidth_GBps", "latency_ns", "npus"):
            sources[f"network.{dim}.{attr}"] = searched
        if attr == "npus" and dims[dim]["scope"] == "scale-up":
            data["gpus_per_node"] = int(value)
            sources["gpus_per_node"] = searched
        if attr == "bandwidth_GBps" and dims[dim]["scope"] == "scale-out" and data.get("scaleout"):
            # the physical NIC description stays the preset's: say so beside it
            sources["scaleout.nic_Gbps"] = (f"preset value; {dim}.bandwidth_GBps was changed by the design-space "
                                            "search, which simulates that bandwidth, not this NIC rate")
    return SystemSpec.parse(data, where="system").with_num_gpus(gpus)


def task_plan(task: Task) -> ParallelPlan:
    """The checked plan of a task (``SpecError`` if the configuration is not a legal plan)."""
    return ParallelPlan.parse(dict(task.plan))
