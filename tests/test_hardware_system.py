"""System presets: structure, sources, consistency with devices and published configs, YAML round trip."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tensorstage.errors import SpecError
from tensorstage.hardware.system import SystemSpec, all_systems, load_system, system_names, write_system_yaml
from tests.support import public_cases, states


def test_presets_cover_the_brief() -> None:
    assert set(system_names()) >= {
        "dgx-a100-selene",
        "dgx-h100-superpod",
        "dgx-h200",
        "dgx-b200",
        "mi300x-node",
    }


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_every_number_has_a_source_stating_it(system: SystemSpec) -> None:
    """Each number's source states that number (as written or in the unit the source uses): a
    changed preset number without a changed citation fails."""
    def check(key: str, value: float, units: dict[str, float] | None = None) -> None:
        text = system.sources[key]
        assert states(text, value, units or {}), (system.name, key, value, text)

    check("gpus_per_node", system.gpus_per_node)
    for d in system.network:
        check(f"network.{d.name}.bandwidth_GBps", d.bandwidth_GBps, {"TB/s": 1e3, "Gb/s": 1 / 8})
        check(f"network.{d.name}.latency_ns", d.latency_ns, {"us": 1e3})
        if d.scope == "scale-out":  # scale-up npus: against gpus_per_node in the next test
            check(f"network.{d.name}.npus", d.npus)
    if system.scaleout is not None:
        check("scaleout.nic_Gbps", system.scaleout.nic_Gbps)
        check("scaleout.nics_per_node", system.scaleout.nics_per_node)
        assert system.scaleout.oversubscription == 1.0  # every preset fabric is non-blocking ...
        assert "non-blocking" in system.sources["scaleout.oversubscription"]  # ... and its source says so


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_network_agrees_with_the_device_and_the_fabric(system: SystemSpec) -> None:
    """The ASTRA-sim dims re-express the device's per-GPU link numbers; both come from datasheets."""
    up = [d for d in system.network if d.scope == "scale-up"]
    out = [d for d in system.network if d.scope == "scale-out"]
    assert math.prod(d.npus for d in up) == system.gpus_per_node
    # a torus (TPU ICI) node is its largest slice, which may be part of the device's pod (v5p: 6144 of 8960)
    torus = all(d.topology == "Ring" for d in up)
    assert system.gpus_per_node == system.device.scaleup_domain or (
        torus and system.gpus_per_node < system.device.scaleup_domain)
    # what one GPU injects into the scale-up fabric per direction == the device's scale-up bandwidth
    assert sum(d.injection_GBps() for d in up) == pytest.approx(system.device.scaleup_GBps)
    if system.scaleout is None:  # one ICI pod without a scale-out network
        assert torus and not out
        return
    # rail-optimized: one NIC per GPU, so the per-GPU scale-out link is node NIC bandwidth / GPUs per node
    assert system.scaleout is not None and len(out) == 1
    per_gpu = system.scaleout.nic_Gbps * system.scaleout.nics_per_node / 8 / system.gpus_per_node
    assert out[0].bandwidth_GBps == pytest.approx(per_gpu)
    assert out[0].bandwidth_GBps == pytest.approx(system.device.scaleout_GBps)
    assert system.num_gpus == system.gpus_per_node * out[0].npus


def test_selene_and_superpod_match_the_published_configs() -> None:
    """public_cases.yaml Selene runs: '8x 200 Gb/s HDR InfiniBand per node', NVSwitch 8 GPUs; H100: 450 GB/s/dir."""
    cases = public_cases()["cases"]
    selene = [c["hardware"] for c in cases if "Selene" in str(c.get("hardware", {}).get("system", ""))]
    inter = {h["inter_node"] for h in selene if "inter_node" in h}
    assert inter, "public_cases.yaml should carry Selene cases"
    for text in inter:
        nics, gbps = map(int, re.match(r"(\d+)x (\d+) Gb/s", text).groups())
        s = load_system("dgx-a100-selene")
        assert (s.scaleout.nics_per_node, s.scaleout.nic_Gbps) == (nics, gbps)
    assert load_system("dgx-a100-selene").device.name == "A100-80GB"  # the Selene cases' GPU
    h100 = load_system("dgx-h100-superpod")
    assert h100.network[0].topology == "Switch" and h100.network[0].bandwidth_GBps == 450
    assert (h100.scaleout.nics_per_node, h100.scaleout.nic_Gbps, h100.scaleout.kind) == (
        8,
        400,
        "rail-optimized",
    )
    assert h100.nvls and not load_system("dgx-a100-selene").nvls
    mi300x = load_system("mi300x-node")
    assert mi300x.network[0].topology == "FullyConnected" and mi300x.network[0].links_per_npu() == 7


def test_resize() -> None:
    s = load_system("dgx-h100-superpod", num_gpus=1024)
    assert [d.npus for d in s.network] == [8, 128] and s.num_gpus == 1024 and s.num_nodes == 128
    small = s.with_num_gpus(4)
    assert [d.npus for d in small.network] == [4, 1] and small.num_nodes == 1
    assert small.with_num_gpus(16).network == load_system("dgx-h100-superpod", num_gpus=16).network
    for bad in (12, 0, -8):
        with pytest.raises(SpecError) as exc:
            s.with_num_gpus(bad)
        assert exc.value.field == "num_gpus"


def test_yaml_round_trip(tmp_path: Path) -> None:
    for system in all_systems():
        resized = system.with_num_gpus(system.gpus_per_node * (3 if system.scaleout is not None else 1))
        path = write_system_yaml(resized, tmp_path / f"{system.name}.yaml")
        assert load_system(path) == resized
        assert load_system(str(path), num_gpus=system.gpus_per_node) == system.with_num_gpus(
            system.gpus_per_node
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.yaml" for n in system_names()
    )  # no temp files
    # deterministic bytes
    a = write_system_yaml(all_systems()[0], tmp_path / "a.yaml").read_bytes()
    b = write_system_yaml(all_systems()[0], tmp_path / "b.yaml").read_bytes()
    assert a == b


def test_hand_written_yaml_with_device_by_name(tmp_path: Path) -> None:
    text = """
name: two-node-ring
device: H100
gpus_per_node: 4
network:
  - {name: nvl, scope: scale-up, topology: Ring, npus: 4, bandwidth_GBps: 100, latency_ns: 300}
  - {name: eth, scope: scale-out, topology: Switch, npus: 2, bandwidth_GBps: 12.5, latency_ns: 5000}
scaleout: {kind: fat-tree, nic_Gbps: 100, nics_per_node: 4, oversubscription: 2.0}
sources:
  gpus_per_node: test
  network.nvl.bandwidth_GBps: test
  network.nvl.latency_ns: test
  network.eth.bandwidth_GBps: test
  network.eth.latency_ns: test
  scaleout.nic_Gbps: test
  scaleout.nics_per_node: test
  scaleout.oversubscription: test
"""
    path = tmp_path / "sys.yaml"
    path.write_text(text)
    s = load_system(path)
    assert s.device.name == "H100-SXM" and s.num_gpus == 8
    assert s.network[0].injection_GBps() == 200  # ring: two neighbours
    assert s.scaleout.node_GBps() == pytest.approx(50)


def _bad(tmp_path: Path, text: str) -> SpecError:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_system(path)
    assert "\n" not in str(exc.value)
    return exc.value


def test_invalid_yaml_fields_name_the_field(tmp_path: Path) -> None:
    head = "name: x\ndevice: H100\ngpus_per_node: 8\n"
    dim = "{name: a, scope: scale-up, topology: %s, npus: 8, bandwidth_GBps: %s, latency_ns: 1}"
    err = _bad(tmp_path, head + f"network: [{dim % ('Torus', 1)}]\nsources: {{}}\n")
    assert err.field == "system.network.0.topology" and err.allowed == ("Ring", "FullyConnected", "Switch")
    err = _bad(tmp_path, head + f"network: [{dim % ('Ring', -1)}]\nsources: {{}}\n")
    assert err.field == "system.network.0.bandwidth_GBps"
    err = _bad(tmp_path, head + f"network: [{dim % ('Ring', 1)}]\nsources: {{}}\n")
    assert err.field == "system.sources" and "gpus_per_node" in str(err)
    err = _bad(tmp_path, "name: x\ndevice: H1000\n")
    assert err.field == "system.device" and "H100-SXM" in str(err)
    err = _bad(tmp_path, head + "netwrk: []\n")
    assert err.field in {"system.network", "system.netwrk"}
    err = _bad(tmp_path, "name: [x\n")
    assert err.field == "system" and "YAML" in str(err)


def test_unknown_system_name_suggests_closest() -> None:
    with pytest.raises(SpecError) as exc:
        load_system("dgx-h100")
    assert exc.value.field == "system"
    assert "did you mean dgx-h100-superpod" in str(exc.value)
