"""`tensorstage models` / `tensorstage show` through the real entry point (exit codes, stderr, JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensorstage.model import list_presets
from tests.support import run_main

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


def _mixtral_params(L: int, h: int, heads: int, kv: int, ffn: int, vocab: int, experts: int, top_k: int
                    ) -> tuple[int, int]:
    """(total, active) parameters of a Mixtral config, counted by hand from the HF model's modules:
    q/o h x h, k/v h x (kv * h/heads), no biases; per expert SwiGLU 3 x h x ffn; router h x E;
    two RMSNorm weights per layer and a final one; untied embedding and LM head."""
    attn = 2 * h * h + 2 * h * (kv * h // heads)
    expert = 3 * h * ffn
    per_layer = attn + h * experts + 2 * h
    outside = 2 * vocab * h + h
    return L * (per_layer + experts * expert) + outside, L * (per_layer + top_k * expert) + outside


def _row(table: str, name: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.split("│")[1:2] and x.split("│")[1].strip() == name)
    return [c.strip() for c in line.split("│")[1:-1]]


def test_models_table() -> None:
    out = _run("models")
    assert out.returncode == 0, out.stderr
    # Mistral's announcements: Mixtral 8x7B "46.7B total, 12.9B active"; 8x22B "141B, 39B active"
    for name, cfg, published in (("mixtral-8x7b", (32, 4096, 32, 8, 14336, 32000, 8, 2), (46.7e9, 12.9e9)),
                                 ("mixtral-8x22b", (56, 6144, 48, 8, 16384, 32768, 8, 2), (141e9, 39e9))):
        total, active = _mixtral_params(*cfg)
        assert total == pytest.approx(published[0], rel=0.005) and active == pytest.approx(published[1], rel=0.01)
        row = _row(out.stdout, name)
        assert row[-2:] == [f"{total / 1e9:.2f}B", f"{active / 1e9:.2f}B"], row
        assert row[2:4] == [str(cfg[0]), f"{cfg[1]:,}"] and row[7] == f"{cfg[6]}/{cfg[7]}"


def test_show_json_fields_and_breakdown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_main(monkeypatch, capsys, "show", "GPT-OSS-120B", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"]["hidden"] == 2880 and data["model"]["moe"]["num_experts"] == 128
    # By hand from the HF config (openai/gpt-oss-120b): 36 layers, h 2880, 64 heads x 64 + 8 KV heads,
    # biases on q/k/v/o, one attention sink per head; 128 experts of width 2880 with biased fused
    # gate_up (2 x 2880) and down projections, a biased router; untied vocab 201088 embedding and head.
    h, dh, heads, kv, E, f, V, L = 2880, 64, 64, 8, 128, 2880, 201_088, 36
    attn = (h * heads * dh + heads * dh) + 2 * (h * kv * dh + kv * dh) + (heads * dh * h + h) + heads
    experts = E * ((h * 2 * f + 2 * f) + (f * h + h))
    layer = attn + (h * E + E) + experts + 2 * h
    total = L * layer + 2 * V * h + h
    assert round(total / 1e9, 2) == 116.83  # OpenAI gpt-oss model card: 116.83B total parameters
    assert data["params"]["total"] == total
    assert (
        data["params"]["moe_layer"]["total"] * 36 + data["params"]["embedding"] * 2 + 2880 == 116_829_156_672
    )


def test_show_table_for_hf_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main(monkeypatch, capsys, "show", str(DATA / "hf" / "gpt2.json"))
    assert out.returncode == 0, out.stderr
    # GPT-2 small by hand: wte 50257 x 768, wpe 1024 x 768, 12 blocks of (2 LayerNorms, c_attn 768 x 2304
    # + bias, c_proj 768 x 768 + bias, c_fc 768 x 3072 + bias, c_proj 3072 x 768 + bias), ln_f; tied head
    h, L = 768, 12
    block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
    total = 50257 * h + 1024 * h + L * block + 2 * h
    assert f"{total:,}" in out.stdout


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
