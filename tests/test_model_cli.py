"""`tensorstage models` / `tensorstage show` through the real entry point (exit codes, stderr, JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import run_main

from tensorstage.model import list_presets

DATA = Path(__file__).parent / "data"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a fresh interpreter (proves: exit code, no traceback)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "tensorstage.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_models_json_lists_every_preset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_main(monkeypatch, capsys, "models", "--json")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["name"] for r in records] == list_presets()
    ds = next(r for r in records if r["name"] == "deepseek-v3")
    assert (ds["experts"], ds["top_k"], ds["layers"]) == (256, 8, 61)
    assert 671.0e9 <= ds["total_params"] <= 671.1e9


def test_models_table() -> None:
    out = _run("models")
    assert out.returncode == 0, out.stderr
    assert "mixtral-8x22b" in out.stdout and "46.70B" in out.stdout and "12.88B" in out.stdout


def test_show_json_fields_and_breakdown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_main(monkeypatch, capsys, "show", "GPT-OSS-120B", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"]["hidden"] == 2880 and data["model"]["moe"]["num_experts"] == 128
    assert data["params"]["total"] == 116_829_156_672
    assert (
        data["params"]["moe_layer"]["total"] * 36 + data["params"]["embedding"] * 2 + 2880 == 116_829_156_672
    )


def test_show_table_for_hf_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main(monkeypatch, capsys, "show", str(DATA / "hf" / "gpt2.json"))
    assert out.returncode == 0, out.stderr
    assert "124,439,808" in out.stdout


def test_unknown_preset_exit_2_one_line() -> None:
    out = _run("show", "llama3-7b")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "llama3-8b" in lines[0] and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_malformed_yaml_exit_2_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: 2\nhidden: [64\n")
    out = _run("show", str(path), "--json")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in out.stderr


def test_malformed_json_exit_2_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["LlamaForCausalLM"],\n')
    out = run_main(monkeypatch, capsys, "show", str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid JSON" in lines[0] and "Traceback" not in out.stderr


def test_unsupported_architecture_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"], "d_model": 512}))
    out = run_main(monkeypatch, capsys, "show", str(path))
    assert out.returncode == 2
    assert "T5ForConditionalGeneration" in out.stderr and len(out.stderr.strip().splitlines()) == 1
