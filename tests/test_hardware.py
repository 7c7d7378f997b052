"""Device presets: every number sourced, and the numbers agree with independent published values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tensorstage.errors import SpecError
from tensorstage.hardware.device import DTYPES, DeviceSpec, numeric_fields
from tensorstage.hardware.presets import all_devices, device_names, load_device
from tests.support import public_cases, states

GiB = 2**30

EXPECTED_PRESETS = {
    "A100-40GB",
    "A100-80GB",
    "H100-SXM",
    "H800",
    "H200",
    "B200",
    "MI250X-GCD",
    "MI300X",
    "TPU-v4",
    "TPU-v5p",
}


def test_all_presets_load_and_cover_the_brief() -> None:
    assert set(device_names()) == EXPECTED_PRESETS
    for d in all_devices():
        assert d.bf16_flops > 1e14  # every preset is a modern accelerator: > 100 TFLOP/s bf16
        assert d.hbm_bytes >= 32 * GiB


#: each numeric field in the unit its sources quote (value multiplier) and the other units they use
_FIELD_UNITS: dict[str, tuple[float, dict[str, float]]] = {
    **{f: (1e-12, {"PFLOPS": 1e3}) for f in ("fp32_flops", "tf32_flops", "bf16_flops", "fp16_flops", "fp8_flops")},
    **{f: (1.0, {"TB/s": 1e3, "Gb/s": 1 / 8, "Gbps": 1 / 8}) for f in ("hbm_GBps", "scaleup_GBps", "scaleout_GBps")},
    "hbm_bytes": (1 / GiB, {}),  # datasheet "80GB" is read as GiB (the preset convention, stated in B200's source)
    "sm_count": (1.0, {}),
    "scaleup_domain": (1.0, {}),
}


@pytest.mark.parametrize("device", all_devices(), ids=lambda d: d.name)
def test_every_numeric_field_has_a_source_stating_it(device: DeviceSpec) -> None:
    """Every number has a source, and a cited (datasheet, paper, docs) source states that very number
    (as written, in another unit, or divided as the text says): a changed preset number without a
    changed citation fails. MEASURED / ASSUMPTION fields are checked by the tests below."""
    checked = 0
    for field in numeric_fields():
        value = getattr(device, field)
        if value is None:
            continue
        text = device.sources.get(field, "")
        assert text.strip(), f"{device.name}.{field} has no source"
        if text.startswith(("MEASURED", "ASSUMPTION")):
            continue
        scale, units = _FIELD_UNITS[field]
        assert states(text, value * scale, units), (device.name, field, value, text)
        checked += 1
    assert checked >= 5
    # efficiencies are never datasheet numbers: each says MEASURED or ASSUMPTION
    for field in ("matmul_efficiency", "hbm_efficiency", "kernel_launch_s"):
        assert device.sources[field].startswith(("MEASURED", "ASSUMPTION")), field
    assert "kernel_launch_s" in device.assumed_fields()


def _reference() -> list[dict]:
    return public_cases()["hardware_reference"]


def _per_direction_GBps(text: str) -> float:
    match = re.search(r"(\d+(?:\.\d+)?) GB/s per (?:GPU per )?direction", text)
    assert match, text
    return float(match.group(1))


def test_numbers_match_public_cases_hardware_reference() -> None:
    """public_cases.yaml was compiled independently from the datasheets; every listed number must agree."""
    checked = 0
    not_presets = {"H800-SXM5-80GB"}  # export part, deliberately not a preset
    for ref in _reference():
        if ref["id"] in not_presets:
            continue
        d = load_device(ref["id"])  # reference ids are preset aliases
        for key in ("bf16_dense_tflops", "bf16_tflops"):
            if key in ref:
                assert d.bf16_flops == pytest.approx(ref[key] * 1e12), (ref["id"], key)
                checked += 1
        if "fp16_dense_tflops" in ref:
            assert d.fp16_flops == pytest.approx(ref["fp16_dense_tflops"] * 1e12)
            checked += 1
        if "fp8_dense_tflops" in ref:
            assert d.fp8_flops == pytest.approx(ref["fp8_dense_tflops"] * 1e12)
            checked += 1
        if "hbm_GBps" in ref:
            assert d.hbm_GBps == pytest.approx(ref["hbm_GBps"])
            checked += 1
        if "hbm_GiB" in ref:
            assert d.hbm_bytes == ref["hbm_GiB"] * GiB
            checked += 1
        if "nvlink" in ref:
            assert d.scaleup_GBps == pytest.approx(_per_direction_GBps(ref["nvlink"]))
            assert f"({d.scaleup_domain} GPUs" in ref["nvlink"]
            checked += 1
        if "inter_node" in ref:
            assert d.scaleout_GBps == pytest.approx(_per_direction_GBps(ref["inter_node"]))
            checked += 1
    assert checked >= 20


def test_datasheet_arithmetic_independently() -> None:
    """Closed forms from the datasheets, written here rather than copied from the presets."""
    b200 = load_device("B200")
    # HGX B200 (8 GPUs, with sparsity): BF16 36 PFLOPS, FP8 72 PFLOPS, TF32 18 PFLOPS, FP32 600 TFLOPS
    assert b200.bf16_flops * 8 * 2 == pytest.approx(36e15)
    assert b200.fp8_flops * 8 * 2 == pytest.approx(72e15)
    assert b200.tf32_flops * 8 * 2 == pytest.approx(18e15)
    assert b200.fp32_flops * 8 == pytest.approx(600e12)
    assert b200.hbm_bytes * 8 == 1440 * GiB  # DGX B200: 1,440 GB total
    mi250x = load_device("MI250X")  # alias of the per-GCD preset
    assert mi250x.name == "MI250X-GCD"
    assert mi250x.bf16_flops * 2 == pytest.approx(383e12)  # package datasheet, 2 GCDs
    assert mi250x.hbm_bytes * 2 == 128 * GiB
    mi300x = load_device("MI300X")
    assert mi300x.scaleup_GBps == pytest.approx(7 * 128 / 2)  # 7 links x 128 GB/s bidirectional
    v5p = load_device("TPU-v5p")
    assert v5p.scaleup_GBps == pytest.approx(4800 / 8 * 1)  # 4800 Gb/s ICI per chip = 600 GB/s
    assert v5p.scaleout_GBps == pytest.approx(50 / 8)  # 50 Gb/s DCN per chip


def test_roofline_ridge_points_match_published_values() -> None:
    """Ridge point (dense bf16 FLOP per HBM byte) from the datasheets: H100 SXM 989 TFLOP/s over 3.35 TB/s
    = 295, H200 989 TFLOP/s over 4.8 TB/s = 206."""
    h100, h200 = load_device("H100"), load_device("H200")
    assert h100.bf16_flops / h100.hbm_Bps == pytest.approx(295, abs=1)
    assert h200.bf16_flops / h200.hbm_Bps == pytest.approx(206, abs=1)


def test_nvidia_tensor_core_ratios() -> None:
    """Hopper/Blackwell/Ampere tensor cores: fp16 == bf16, tf32 == bf16 / 2, fp8 == 2 x bf16 where present."""
    for d in all_devices():
        if d.vendor != "NVIDIA":
            continue
        assert d.fp16_flops == d.bf16_flops
        assert d.tf32_flops == pytest.approx(d.bf16_flops / 2, rel=1e-3)
        if d.fp8_flops is not None:
            assert d.fp8_flops == pytest.approx(2 * d.bf16_flops, rel=1e-3)  # datasheets round 989.4 / 1978.9
    assert load_device("A100-80GB").fp8_flops is None  # no fp8 path on Ampere


def _measured(device: DeviceSpec, field: str, unit: str) -> float:
    """The best measured rate a MEASURED source records, e.g. ``769-798 TFLOP/s`` -> 798 (in ``unit``)."""
    text = device.sources[field]
    assert text.startswith("MEASURED"), (device.name, field)
    match = re.search(r"~?(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))? " + re.escape(unit), text)
    assert match, (device.name, field, text)
    return float(match.group(2) or match.group(1))


@pytest.mark.parametrize("device", [d for d in all_devices() if d.sources["matmul_efficiency"].startswith("MEASURED")],
                         ids=lambda d: d.name)
def test_measured_efficiencies_follow_from_the_recorded_measurements(device: DeviceSpec) -> None:
    """Each MEASURED efficiency is the measurement its source records over the datasheet peak (to the
    two-decimal rounding the presets use): best bf16 GEMM rate / bf16 peak (x sustained / boost clock
    where the source records a power-limited clock), device-to-device
    copy rate / HBM bandwidth. The measurement is read from the preset's own source text, so a changed
    number without a changed record fails."""
    gemm_Fps = _measured(device, "matmul_efficiency", "TFLOP/s") * 1e12
    # a sustained level: the best GEMM rate x the clock held at the power limit / the boost clock
    clock = re.search(r"(\d+) of (\d+) MHz", device.sources["matmul_efficiency"])
    sustained = int(clock.group(1)) / int(clock.group(2)) if clock else 1.0
    assert device.matmul_efficiency == pytest.approx(gemm_Fps * sustained / device.bf16_flops, abs=0.01)
    if device.sources["hbm_efficiency"].startswith("MEASURED"):
        copy_Bps = _measured(device, "hbm_efficiency", "TB/s") * 1e12
        assert device.hbm_efficiency == pytest.approx(copy_Bps / device.hbm_Bps, abs=0.01)
    assert device.achievable_flops("bf16") == pytest.approx(device.bf16_flops * device.matmul_efficiency)


def test_peak_flops_lookup_and_errors() -> None:
    h100 = load_device("h100")
    assert h100.peak_flops("fp8") == 1979e12
    assert h100.supported_dtypes() == DTYPES
    with pytest.raises(SpecError) as exc:
        load_device("A100").peak_flops("fp8")
    assert exc.value.field == "dtype" and "bf16" in exc.value.allowed
    with pytest.raises(SpecError) as exc:
        h100.peak_flops("int4")
    assert exc.value.allowed == DTYPES


def test_unknown_device_suggests_closest() -> None:
    with pytest.raises(SpecError) as exc:
        load_device("H10")
    assert exc.value.field == "device"
    assert "H100-SXM" in str(exc.value) and "\n" not in str(exc.value)


def _h100_dict() -> dict:
    return load_device("H100-SXM").model_dump(mode="json")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hbm_GBps": -1.0}, "device.hbm_GBps"),
        ({"matmul_efficiency": 1.5}, "device.matmul_efficiency"),
        ({"vendor": "Intel"}, "device.vendor"),
        ({"bogus_flops": 1.0}, "device.bogus_flops"),
        ({"hbm_bytes": "lots"}, "device.hbm_bytes"),
        ({"bf16_flops": None}, "device.bf16_flops"),
    ],
)
def test_invalid_fields_name_the_field(change: dict, field: str) -> None:
    data = _h100_dict() | change
    with pytest.raises(SpecError) as exc:
        DeviceSpec.parse(data)
    assert exc.value.field == field
    assert "\n" not in str(exc.value)


def test_a_number_without_a_source_is_refused() -> None:
    data = _h100_dict()
    del data["sources"]["fp8_flops"]
    with pytest.raises(SpecError) as exc:
        DeviceSpec.parse(data)
    assert exc.value.field == "device.sources" and "fp8_flops" in str(exc.value)


def test_device_yaml_file(tmp_path: Path) -> None:
    data = _h100_dict() | {"name": "H100-derated", "matmul_efficiency": 0.6, "aliases": []}
    data["sources"]["matmul_efficiency"] = "ASSUMPTION: derated for a test"
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data))
    d = load_device(str(path))
    assert d.name == "H100-derated" and d.matmul_efficiency == 0.6
    assert d.model_dump(mode="json") == data
