"""``tensorstage serve``: JSON output and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from tests.support import run_main


def test_serve_json(monkeypatch, capsys):
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--qps", "50", "--requests", "40", "--isl", "64",
                 "--osl", "8", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["requests"] == 40 and doc["output_tokens"] == 320
    assert doc["ttft_ms"]["p50"] <= doc["ttft_ms"]["p99"]
    assert 0 <= doc["slo_attainment"] <= 1


def test_serve_gqa_kv_reuse_flag_is_recorded_and_slows_gqa_decode(monkeypatch, capsys):
    """``--no-gqa-kv-reuse`` (TensorRT-LLM's pre-0.7 generation kernel) makes a GQA model's decode
    slower, and the JSON records the override so the run can be repeated."""
    docs = []
    for flag in ("--gqa-kv-reuse", "--no-gqa-kv-reuse"):
        r = run_main(monkeypatch, capsys, "serve", "llama3-8b", "--engine", "static", "--offline", "32", "--isl",
                     "128", "--osl", "256", "--max-num-seqs", "32", flag, "--json")
        assert r.returncode == 0, r.stderr
        docs.append(json.loads(r.stdout))
    assert [d["engine_overrides"] for d in docs] == [{"gqa_kv_reuse": True, "max_num_seqs": 32},
                                                    {"gqa_kv_reuse": False, "max_num_seqs": 32}]
    assert docs[1]["output_tokens_per_s"] < docs[0]["output_tokens_per_s"]


@pytest.mark.parametrize(("args", "field"), [
    (["--engine", "nope"], "engine"),
    (["--qps", "0"], "workload.rate_per_s"),
    (["--qps", "1", "--offline", "3"], "workload"),
    (["--isl", "0"], "workload.input_tokens"),
    (["--weight-dtype", "int3"], "--weight-dtype"),
    (["--router", "random"], "--router"),
    (["--max-num-seqs", "0"], "engine.max_num_seqs"),
    (["--slo-ttft-ms", "-5"], "--slo-ttft-ms"),
    (["--disagg", "2-1"], "--disagg"),
    (["--tp", "5"], "tp"),
    (["--disagg", "0:1"], "--disagg"),
])
def test_serve_bad_input_is_one_line(monkeypatch, capsys, args, field):
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), r.stderr


def test_serve_timeline_deterministic(tmp_path, monkeypatch, capsys):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p in paths:
        r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--qps", "50", "--requests", "20", "--osl", "4",
                     "--timeline", str(p))
        assert r.returncode == 0, r.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    doc = json.loads(paths[0].read_text())
    names = {e["name"] for e in doc["traceEvents"]}
    assert {"step", "queue+prefill", "decode", "process_name"} <= names
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--timeline", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: --timeline:")


def test_serve_report_deterministic_and_safe(tmp_path, monkeypatch, capsys):
    args = ["serve", "gpt3-125m", "--qps", "100", "--requests", "30", "--osl", "5", "--slo-ttft-ms", "5"]
    outs = [tmp_path / "r1", tmp_path / "r2"]
    for out in outs:
        r = run_main(monkeypatch, capsys, *args, "--report", str(out))
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["latency_cdf.png", "load.png", "report.md", "result.json"]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    res = json.loads((outs[0] / "result.json").read_text())
    assert len(res["per_request"]["ttft_s"]) == 30
    r = run_main(monkeypatch, capsys, *args, "--report", str(outs[0]))  # an earlier report: replaced
    assert r.returncode == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    r = run_main(monkeypatch, capsys, *args, "--report", str(foreign))
    assert r.returncode == 2 and r.stderr.startswith("error: --report:") and (foreign / "notes.txt").exists()
