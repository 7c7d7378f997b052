"""``tensorstage hardware`` and ``tensorstage systems``: browse device and system presets.

Why a command: choosing a cluster for a plan starts from the peaks, memory and link speeds of the
candidates side by side, and every number should be traceable, so the detail views print each
field's source (assumptions are marked as such).
"""

from __future__ import annotations

from typing import Any

import typer

from tensorstage.errors import SpecError
from tensorstage.hardware.device import DeviceSpec, numeric_fields
from tensorstage.hardware.presets import all_devices, load_device
from tensorstage.hardware.system import SystemSpec, all_systems, load_system, system_names
from tensorstage.report.console import print_json, print_table

_GiB = 2**30


def _tflops(value: float | None) -> float | None:
    return None if value is None else value / 1e12


def device_row(d: DeviceSpec) -> dict[str, Any]:
    """One device as the flat record of the summary table (display units: TFLOP/s, GiB, TB/s, GB/s)."""
    return {
        "name": d.name,
        "vendor": d.vendor,
        "bf16_tflops": _tflops(d.bf16_flops),
        "fp8_tflops": _tflops(d.fp8_flops),
        "hbm_GiB": d.hbm_bytes / _GiB,
        "hbm_TBps": d.hbm_GBps / 1e3,
        "scaleup_GBps": d.scaleup_GBps,
        "scaleup_domain": d.scaleup_domain,
        "scaleout_GBps": d.scaleout_GBps,
    }


def _dims(s: SystemSpec) -> str:
    return " | ".join(
        f"{d.name}: {d.topology} {d.npus} x {d.bandwidth_GBps:g} GB/s, {d.latency_ns:g} ns" for d in s.network
    )


def system_row(s: SystemSpec) -> dict[str, Any]:
    """One system as the flat record of the summary table."""
    fabric = s.scaleout
    return {
        "name": s.name,
        "device": s.device.name,
        "gpus_per_node": s.gpus_per_node,
        "num_gpus": s.num_gpus,
        "network": _dims(s),
        "nvls": s.nvls,
        "scaleout": None
        if fabric is None
        else f"{fabric.kind}, {fabric.nics_per_node} x {fabric.nic_Gbps:g} Gb/s, "
        f"{fabric.oversubscription:g}:1",
    }


def _hardware(name: str | None, json_out: bool) -> None:
    if name is not None:
        _device_detail(load_device(name), json_out)
        return
    devices = all_devices()
    if json_out:
        print_json([d.model_dump(mode="json") for d in devices])
        return
    columns = [
        "name",
        "vendor",
        "bf16 TFLOP/s",
        "fp8 TFLOP/s",
        "HBM GiB",
        "HBM TB/s",
        "scale-up GB/s/dir",
        "scale-up domain",
        "NIC GB/s/dir",
    ]
    print_table("Device presets (dense peaks)", columns, [list(device_row(d).values()) for d in devices])


def _device_detail(d: DeviceSpec, json_out: bool) -> None:
    if json_out:
        print_json(d.model_dump(mode="json"))
        return
    rows = [[f, getattr(d, f), d.sources.get(f, "-")] for f in numeric_fields()]
    print_table(f"{d.name}: {d.description}", ["field", "value", "source"], rows)


def _systems(name: str | None, num_gpus: int | None, json_out: bool, yaml_out: bool = False) -> None:
    if yaml_out:  # a starting template: the file loads back as the same system (docs/formats.md)
        import yaml

        if name is None:
            raise SpecError("system", "--yaml needs a system NAME", system_names())
        spec = load_system(name, num_gpus=num_gpus)
        print(yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True, width=110), end="")
        return
    if name is not None:
        _system_detail(load_system(name, num_gpus=num_gpus), json_out)
        return
    systems = all_systems() if num_gpus is None else [s.with_num_gpus(num_gpus) for s in all_systems()]
    if json_out:
        print_json([s.to_dict() for s in systems])
        return
    columns = [
        "name",
        "device",
        "GPUs/node",
        "GPUs",
        "network (per link, per direction)",
        "NVLS",
        "scale-out",
    ]
    print_table("System presets", columns, [list(system_row(s).values()) for s in systems])


def _system_detail(s: SystemSpec, json_out: bool) -> None:
    if json_out:
        print_json(s.to_dict())
        return
    rows: list[list[Any]] = [
        ["device", s.device.name, "load with `tensorstage hardware " + s.device.name + "`"],
        ["gpus_per_node", s.gpus_per_node, s.sources.get("gpus_per_node", "-")],
        ["num_gpus", s.num_gpus, "product of the dimensions' npus"],
        ["nvls", s.nvls, s.sources.get("nvls", "-")],
    ]
    for d in s.network:
        for f in ("topology", "npus", "bandwidth_GBps", "latency_ns"):
            rows.append([f"network.{d.name}.{f}", getattr(d, f), s.sources.get(f"network.{d.name}.{f}", "-")])
    if s.scaleout is not None:
        for f in ("kind", "nic_Gbps", "nics_per_node", "oversubscription"):
            rows.append([f"scaleout.{f}", getattr(s.scaleout, f), s.sources.get(f"scaleout.{f}", "-")])
    print_table(f"{s.name}: {s.description}", ["field", "value", "source"], rows)


def register(app: typer.Typer) -> None:
    """Add ``hardware`` and ``systems`` to the CLI."""

    @app.command("hardware")
    def hardware_cmd(
        name: str = typer.Argument(
            None, help="Device preset name/alias or device YAML path; omit to list all."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List device presets (dense peaks, memory, links), or show one device with each number's source."""
        _hardware(name, json_out)

    @app.command("systems")
    def systems_cmd(
        name: str = typer.Argument(None, help="System preset name or system YAML path; omit to list all."),
        num_gpus: int = typer.Option(None, "--num-gpus", help="Resize the system to this many GPUs."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        yaml_out: bool = typer.Option(False, "--yaml", help="Print the system as a system YAML (a template to edit)."),
    ) -> None:
        """List system presets (nodes, network dimensions, fabric), or show one with each number's source."""
        _systems(name, num_gpus, json_out, yaml_out)
