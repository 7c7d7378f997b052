"""Limits checked before any work: sizes, int64, silent substitutions, overwrites, disk space.

Each case is a user's typo or a file that is not what it claims; the expected behaviour is a
one-line error naming the field (exit 2) in well under a second, or a warning line when the input
is legal but doubtful.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tensorstage import api
from tensorstage.errors import InputWarning, SpecError
from tensorstage.limits import INT64_MAX, MAX_LAYERS, MAX_WORLD
from tests.support import run_main

SIM = ["simulate", "llama3.1-8b", "--system", "dgx-h100-superpod"]
TINY = ["--tp", "1", "--pp", "1", "--dp", "1", "--seq", "128", "--global-batch", "1"]


@pytest.mark.parametrize("args, field", [
    ([*SIM, "--dp", "1000000000000"], "world"),
    ([*SIM, "--dp", str(2**63)], "plan.dp"),
    ([*SIM, "--seq", str(2**63)], "plan.seq"),
    ([*SIM, "--global-batch", "0"], "global_batch"),
    (["generate", "llama3.1-8b", "--dp", "1000000000000", "--out", "g_huge"], "world"),
    (["run", "--dp", "1000000000000", "--out", "r_huge"], "world"),
    (["systems", "dgx-h100-superpod", "--num-gpus", "1000000000000"], "num_gpus"),
])
def test_sizes_are_refused_before_work(args: list[str], field: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    res = run_main(monkeypatch, capsys, *args)
    assert time.perf_counter() - t0 < 15  # refused up front, not after minutes (slack: a loaded CI box)
    assert res.returncode == 2 and res.stderr.startswith(f"error: {field}: ") and res.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no output, no hidden temp folder


def test_limits_sit_far_above_real_inputs() -> None:
    assert MAX_WORLD >= 1_000_000 and MAX_LAYERS >= 1_000 and INT64_MAX == 9223372036854775807
    api.make_plan(dp=MAX_WORLD // 4, global_batch=MAX_WORLD)  # at the limit: accepted (2 * 2 * 2**18 = 2**20)
    with pytest.raises(SpecError) as err:
        api.make_plan(dp=MAX_WORLD // 4 + 1, global_batch=MAX_WORLD // 4 + 1)
    assert err.value.field == "world"


@pytest.mark.parametrize("layers, value", [("true", "true"), ("1000000000000", "1e12"), (str(2**64), "2**64")])
def test_model_files_with_bad_layer_counts(layers: str, value: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"name: m\nnum_layers: {layers}\nhidden: 512\nnum_heads: 8\nffn: 2048\nvocab: 1000\n")
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "num_attention_heads": 8,
                              "intermediate_size": 2048, "vocab_size": 1000,
                              "num_hidden_layers": json.loads(layers)}))
    for path in (f, hf):
        for cmd in (["show", str(path)], ["simulate", str(path), "--system", "dgx-h100-superpod"]):
            t0 = time.perf_counter()
            res = run_main(monkeypatch, capsys, *cmd)
            assert time.perf_counter() - t0 < 15, value
            assert res.returncode == 2 and res.stderr.count("\n") == 1 and "num_layers" in res.stderr, res.stderr


def test_sequence_beyond_the_models_context_warns(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(InputWarning, match="131,072"):  # Llama 3.1: 128K context (Meta model card)
        api.lower("llama3.1-8b", api.make_plan(tp=1, pp=1, dp=1, seq=262144, global_batch=1))
    spec = api.load_model("llama3.1-8b")
    assert spec.max_seq == 131072


def test_timeline_never_overwrites_a_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mytimeline.json"
    mine.write_text('{"my": "data"}')
    args = ["simulate", "gpt3-125m", "--system", "dgx-a100-selene", *TINY, "--timeline", str(mine)]
    res = run_main(monkeypatch, capsys, *args)
    assert res.returncode == 2 and "timeline: " in res.stderr and "--force" in res.stderr
    assert mine.read_text() == '{"my": "data"}'
    ours = tmp_path / "ours.json"
    for _ in range(2):  # our own earlier timeline is replaced without --force
        res = run_main(monkeypatch, capsys, *args[:-1], str(ours))
        assert res.returncode == 0, res.stderr
    assert json.loads(ours.read_text())["otherData"]["tool"] == "tensorstage"
    res = run_main(monkeypatch, capsys, *args, "--force")
    assert res.returncode == 0 and json.loads(mine.read_text())["otherData"]["tool"] == "tensorstage"


def test_generate_prints_its_estimate_and_refuses_what_will_not_fit(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import tensorstage.trace.writer as writer

    out = tmp_path / "g"
    args = ["generate", "gpt3-125m", "--tp", "1", "--pp", "2", "--dp", "2", "--seq", "128", "--out", str(out)]
    res = run_main(monkeypatch, capsys, *args, "--json")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("estimate: "))
    manifest = json.loads(res.stdout)
    est_mb = float(line.split("about ")[1].split(" MB")[0].replace(",", ""))
    assert line.startswith(f"estimate: {manifest['world']} files")
    real_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6  # every file written, ET and side files
    assert abs(est_mb - real_mb) <= 0.25 * real_mb + 0.1
    monkeypatch.setattr(writer, "free_bytes", lambda path: 1000)
    res = run_main(monkeypatch, capsys, *args)
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("error: out: the traces need about")
    assert "--force" in res.stderr
    res = run_main(monkeypatch, capsys, *args, "--force")
    assert res.returncode == 0, res.stderr
