"""Trace loaders (Azure CSV, Mooncake JSONL, BurstGPT CSV): content and one-line errors naming row and field."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstage.errors import SpecError
from tensorstage.serve.traces import load_trace
from tests.support import run_main

AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n" \
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:51.0000000,20,0\n"
BURST = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" \
        "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,0,1087,Conversation log\n118,GPT-4,417,276,693,API log\n"
MOON = '{"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [1, 2, 3]}\n' \
       '{"timestamp": 250, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 7]}\n'


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_times_relative_and_zero_output_rows_skipped(tmp_path):
    t = load_trace(_write(tmp_path, "azure.csv", AZURE))
    np.testing.assert_allclose(t.arrival_s, [0.0, 4.314579], atol=1e-6)  # 50.9951690 - 46.6805900
    assert t.prompt_tokens.tolist() == [374, 396] and t.output_tokens.tolist() == [44, 109]


def test_burstgpt_skips_failed_requests(tmp_path):
    t = load_trace(_write(tmp_path, "burst.csv", BURST))
    assert t.arrival_s.tolist() == [0.0, 113.0] and t.prompt_tokens.tolist() == [472, 417]


def test_mooncake_ms_and_shared_prefix_blocks(tmp_path):
    t = load_trace(_write(tmp_path, "m.jsonl", MOON))
    assert t.arrival_s.tolist() == [0.0, 0.25]
    assert t.prefix_id.tolist() == [-1, 2] and t.prefix_tokens.tolist() == [0, 1024]  # blocks 1, 2 shared


@pytest.mark.parametrize(("name", "text", "field"), [
    ("a.csv", "TIMESTAMP,ContextTokens\n1,2\n", "trace"),  # missing column
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,-3,4\n", "a.csv row 2.ContextTokens"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,abc,4\n", "a.csv row 2.ContextTokens"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n5,3,4\n2,3,4\n", "a.csv row 3.TIMESTAMP"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nnoon,3,4\n", "a.csv row 2.TIMESTAMP"),
    ("a.csv", "", "trace"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "trace"),
    ("m.jsonl", '{"timestamp": 0, "input_length": 5}\n', "m.jsonl row 1.output_length"),
    ("m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 2.5}\n', "m.jsonl row 1.output_length"),
    ("m.jsonl", 'nope\n', "m.jsonl row 1"),
])
def test_bad_traces_name_row_and_field(tmp_path, name, text, field):
    with pytest.raises(SpecError) as exc:
        load_trace(_write(tmp_path, name, text))
    assert exc.value.field == field
    assert "\n" not in str(exc.value)


def test_serve_cli_trace_errors_exit_2(tmp_path, monkeypatch, capsys):
    p = _write(tmp_path, "bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,10,x\n")
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--trace", str(p))
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: bad.csv row 2.GeneratedTokens: not a number: 'x'"
    ok = _write(tmp_path, "ok.csv", AZURE)
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--trace", str(ok), "--json")
    assert r.returncode == 0 and '"requests": 2' in r.stdout


@pytest.mark.parametrize("name", ["t.csv", "t.jsonl"])
def test_binary_trace_file_is_one_line_not_a_traceback(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\xff\xfe\x00TIMESTAMP,ContextTokens\n")
    with pytest.raises(SpecError) as exc:
        load_trace(p)
    assert exc.value.field == str(p) and "not a UTF-8 text file" in str(exc.value)


def test_length_file_rows_drawn_with_their_pairs(tmp_path):
    """A length file's (input, output) rows are drawn whole (the joint shape survives), seeded and
    deterministic; every drawn pair is a row of the file and each row turns up at about 1/rows."""
    from tensorstage.serve import Workload

    rows = [(10, 1), (200, 7), (3000, 50)]
    p = _write(tmp_path, "len.csv", "input_length,output_length\n" + "".join(f"{a},{b}\n" for a, b in rows))
    wl = Workload(3000, 1, 1, arrival="poisson", rate_per_s=5.0, seed=3, lengths_file=str(p)).check()
    a, b = wl.requests(), wl.requests()
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens) and np.array_equal(a.arrival_s, b.arrival_s)
    pairs = set(zip(a.prompt_tokens.tolist(), a.output_tokens.tolist(), strict=True))
    assert pairs == set(rows)
    share = np.mean(a.prompt_tokens == 200)
    assert abs(share - 1 / 3) < 0.04  # binomial sd 0.009


@pytest.mark.parametrize("text, msg", [
    ("a,b\n1,2\n", "lengths: len.csv: missing column 'input_length' (need input_length, output_length)"),
    ("input_length,output_length\n5,0\n", "len.csv row 2.output_length: must be an integer >= 1, got '0'"),
    ("input_length,output_length\n", "lengths: len.csv: no rows"),
])
def test_serve_cli_bad_length_file_exit_2(tmp_path, monkeypatch, capsys, text, msg):
    p = _write(tmp_path, "len.csv", text)
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--lengths", str(p), "--qps", "1")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {msg}"


@pytest.mark.parametrize("args, msg", [
    (["--isl", "99999999999999999999", "--qps", "1"],
     "workload.input_tokens: must be between 1 and 2,147,483,648, got 99999999999999999999"),
    (["--requests", "99999999999999999999", "--qps", "1"],
     "workload.num_requests: must be between 1 and 100,000,000, got 99999999999999999999"),
])
def test_huge_workload_numbers_are_one_line_errors(monkeypatch, capsys, args, msg):
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", *args)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {msg}"


def test_huge_token_counts_in_files_are_one_line_errors(tmp_path, monkeypatch, capsys):
    big = "99999999999999999999999"
    lengths = _write(tmp_path, "len.csv", f"input_length,output_length\n{big},5\n")
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--lengths", str(lengths), "--qps", "1")
    assert r.returncode == 2 and r.stderr.strip() == \
        f"error: len.csv row 2.input_length: must be at most 2,147,483,648 tokens, got '{big}'"
    trace = _write(tmp_path, "az.csv", f"TIMESTAMP,ContextTokens,GeneratedTokens\n1,{big},5\n")
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--trace", str(trace))
    assert r.returncode == 2 and "az.csv row 2.ContextTokens: must be at most" in r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--lengths", "lognormal"], "workload.spread: 0 with lognormal lengths: uniform, normal and lognormal need a "
     "spread > 0, fixed takes none (allowed: fixed, uniform, normal, lognormal)"),
    (["--spread", "0.5"], "workload.spread: 0.5 with fixed lengths: uniform, normal and lognormal need a spread > 0, "
     "fixed takes none (allowed: fixed, uniform, normal, lognormal)"),
])
def test_length_settings_that_would_be_ignored_are_errors(monkeypatch, capsys, args, msg):
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--qps", "1", *args)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {msg}"


def test_length_file_edge_cases(tmp_path, monkeypatch, capsys):
    """A BOM (spreadsheets write one) loads; a directory, an empty file and a missing value say so."""
    from tensorstage.serve.traces import load_lengths

    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffinput_length,output_length\r\n10,2\r\n".encode())
    isl, osl = load_lengths(bom)
    assert isl.tolist() == [10] and osl.tolist() == [2]
    cases = [(tmp_path, f"lengths: {tmp_path} is a directory; give a CSV file"),
             (_write(tmp_path, "e.csv", ""), "lengths: e.csv: empty file"),
             (_write(tmp_path, "m.csv", "input_length,output_length\n10,\n"), "m.csv row 2.output_length: missing value")]
    for path, msg in cases:
        r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--lengths", str(path), "--qps", "1")
        assert r.returncode == 2 and r.stderr.strip() == f"error: {msg}", r.stderr
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--lengths", str(bom), "--spread", "0.2", "--qps", "1")
    assert r.returncode == 2 and "drop --spread" in r.stderr
