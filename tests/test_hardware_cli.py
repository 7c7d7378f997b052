"""`tensorstage hardware` / `tensorstage systems` through the real CLI entry (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorstage.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},  # rich wraps piped tables at 80 columns otherwise
    )


def test_hardware_json_lists_presets_in_si_units() -> None:
    out = _cli("hardware", "--json")
    assert out.returncode == 0, out.stderr
    devices = {d["name"]: d for d in json.loads(out.stdout)}
    assert devices["H100-SXM"]["bf16_flops"] == 989e12  # datasheet dense BF16
    assert devices["H100-SXM"]["hbm_GBps"] == 3350
    assert all(d["sources"] for d in devices.values())


def test_systems_json_and_resize() -> None:
    out = _cli("systems", "dgx-h100-superpod", "--num-gpus", "1024", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [d["npus"] for d in data["network"]] == [8, 128]
    assert data["device"]["name"] == "H100-SXM"


def test_tables_render() -> None:
    out = _cli("hardware")
    assert out.returncode == 0 and "MI300X" in out.stdout and "TPU-v5p" in out.stdout
    out = _cli("systems")
    assert out.returncode == 0 and "dgx-a100-selene" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("hardware", "H10"), "unknown device 'H10'"),
        (("systems", "dgx-h100"), "did you mean dgx-h100-superpod"),
        (("systems", "dgx-h100-superpod", "--num-gpus", "12"), "num_gpus"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: tuple[str, ...], needle: str) -> None:
    out = _cli(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in out.stderr


def test_device_detail_by_alias_shows_sources() -> None:
    out = _cli("hardware", "A100-SXM4-80GB", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["name"] == "A100-80GB" and d["hbm_GBps"] == 2039  # A100 datasheet, 80GB SXM
    out = _cli("hardware", "MI300X")
    assert out.returncode == 0 and "ASSUMPTION" in out.stdout and "datasheet" in out.stdout
