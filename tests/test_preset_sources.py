"""Every device/system preset source is something a user can check: a public document, or a script in
this repository that reproduces the number (bench/bench_kernels.py for measured efficiencies)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HW = ROOT / "src" / "tensorstage" / "hardware"
HIDDEN = re.compile(r"KINDS\.md|\blent\b|/work/|\.library|device tool", re.IGNORECASE)


def _sources(path: Path) -> list[tuple[str, str, str]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = []
    for section in data.values():
        entries = section.values() if isinstance(section, dict) else section
        for entry in entries:
            for field, text in (entry.get("sources") or {}).items():
                out.append((str(entry.get("name")), field, str(text)))
    return out


def test_no_source_cites_a_file_a_user_cannot_see() -> None:
    for path in (HW / "presets.yaml", HW / "systems.yaml"):
        text = path.read_text(encoding="utf-8")
        assert not HIDDEN.search(text), HIDDEN.search(text)
        srcs = _sources(path)
        assert srcs  # the walk found the sources
        for name, field, text in srcs:
            if text.startswith("MEASURED"):  # a measurement names the script that reruns it, or
                # the public documents its numbers were read from (a web address or a named table)
                public = re.search(r"\b[a-z0-9-]+\.(com|org|io)\b|stas00/ml-engineering", text)
                assert "bench/bench_kernels.py" in text or public, (name, field)
                assert (ROOT / "bench" / "bench_kernels.py").is_file()


def test_kernel_benchmark_runs_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "nothing to measure" in out or ("TFLOP/s" in out and "TB/s" in out)
