"""``tensorstage explain``: JSON content against published numbers, errors as one line + exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.errors import SpecError

runner = CliRunner()


def _explain(*args: str) -> dict:
    res = runner.invoke(app, ["explain", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_explain_llama_kv_and_params() -> None:
    data = _explain("llama3.1-8b", "--phase", "decode", "--context", "2048", "--batch", "4")
    assert data["kv_cache_bytes_per_token"] == 131072  # public_cases.yaml F-KV-CACHE
    assert abs(data["params"] - 8.03e9) / 8.03e9 < 1e-3  # Meta model card: 8.03B
    assert set(data["flops_per_token"]) == {"train", "prefill", "decode"}
    # decode per token ~ 2 x params (weights) + attention over the cache; ~3x that for training
    assert 2 * data["params"] < data["flops_per_token"]["decode"] < 2.5 * data["params"]
    assert data["blocks"]["dense"]["count"] == 32


def test_explain_prints_closed_forms() -> None:
    data = _explain("gpt3-125m", "--seq", "2048", "--attention-flops", "full", "--attention", "materialized")
    fwd = data["formulas"]["dense"]["fwd_flops"]
    # GPT-3 125M: h=768, per layer forward matmuls 24*b*s*h^2 + 4*b*s^2*h (Narayanan)
    assert fwd["model"] == f"{4 * 768}*b*s**2 + {24 * 768 * 768}*b*s"
    assert "b" in fwd["symbolic"] and "h" in fwd["symbolic"]
    assert data["formulas"]["dense"]["activation_bytes"]["symbolic"]


def test_explain_table_output() -> None:
    res = runner.invoke(app, ["explain", "llama3.1-8b", "--seq", "1024"])
    assert res.exit_code == 0, res.output
    assert "Closed forms" in res.output and "KV-cache bytes per token" in res.output


def test_explain_bad_input_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tensorstage.cli", "explain", "llama3.1-8b", "--phase", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: phase:")
    for args, field in ((["nosuch-model"], "model"), (["llama3.1-8b", "--seq", "0"], "seq")):
        res = runner.invoke(app, ["explain", *args])
        assert isinstance(res.exception, SpecError) and res.exception.field == field
