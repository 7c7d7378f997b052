"""One default plan for every command and the Python API (`tensorstage.api`).

Independent checks: the GPU count is written out as tp*pp*dp*cp here; `run`, `simulate` and
`generate` must agree with each other (same plan, GPUs, peak memory), and the API example script
must run as documented.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

import tensorstage
from tensorstage import api
from tensorstage.errors import SpecError
from tests.support import run_main

ROOT = Path(__file__).resolve().parents[1]


def test_default_plan_is_the_documented_one() -> None:
    p = api.DEFAULT_PLAN
    assert (p.tp, p.pp, p.dp, p.cp, p.sp, p.zero, p.schedule, p.recompute, p.seq, p.global_batch) == (
        2, 2, 2, 1, True, 1, "1f1b", "selective", 4096, 16)
    assert p.world == 2 * 2 * 2
    assert api.make_plan() == p
    assert "TP 2 PP 2 DP 2, 8 GPUs" in api.describe_plan(p)


def test_flags_override_only_what_they_name_and_say_the_derived_change() -> None:
    choice = api.choose_plan(tp=4, dp=2)
    p = choice.plan
    assert (p.tp, p.pp, p.dp) == (4, 2, 2) and p.world == 4 * 2 * 2
    assert p.sp and p.zero == 1 and p.recompute == "selective" and p.seq == 4096  # kept
    assert len(choice.notes) == 1 and "16 GPUs" in choice.notes[0] and "pp=2" in choice.notes[0]
    assert api.choose_plan(tp=2, pp=2, dp=2).notes == ()  # nothing derived changed
    mb = api.choose_plan(dp=4)  # global batch 16 kept: 16 / (4*1) = 4 micro-batches, not 8
    assert mb.plan.microbatches == 16 // (4 * 1)
    assert any("micro-batches" in n for n in mb.notes)
    assert any("sequence parallelism off" in n for n in api.choose_plan(tp=1).notes)


def test_a_plan_file_replaces_the_default(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("tp: 4\n")
    p = api.make_plan(f, dp=2)
    assert (p.tp, p.pp, p.dp, p.sp) == (4, 1, 2, False)


def test_global_batch_zero_is_an_error_not_a_substitution(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        api.make_plan(global_batch=0)
    assert err.value.field == "global_batch"
    f = tmp_path / "plan.yaml"
    f.write_text("dp: 2\n")
    with pytest.raises(SpecError) as err:
        api.make_plan(f, global_batch=0)
    assert err.value.field == "global_batch"


def test_a_default_seq_the_model_cannot_take_says_where_it_came_from() -> None:
    with pytest.raises(SpecError) as err:  # GPT-3 125M: learned positions, 2048 (GPT-3 paper, Table 2.1)
        api.lower("gpt3-125m", api.DEFAULT_PLAN)
    assert err.value.field == "seq" and "default plan" in err.value.reason


def test_a_kept_default_in_an_error_is_named() -> None:
    with pytest.raises(SpecError) as err:
        api.make_plan(dp=32)  # 16 sequences cannot split over 32 DP ranks
    assert "from the default plan" in str(err.value) and "--global-batch" in str(err.value)


def test_root_reexports_the_api() -> None:
    assert tensorstage.simulate is api.simulate
    assert tensorstage.DEFAULT_PLAN is api.DEFAULT_PLAN
    with pytest.raises(AttributeError):
        tensorstage.no_such_name  # noqa: B018


FLAGS = ["--tp", "1", "--pp", "2", "--dp", "2", "--seq", "512", "--global-batch", "8"]


def test_run_simulate_generate_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    model, system = "gpt3-125m", "dgx-a100-selene"
    sim = run_main(monkeypatch, capsys, "simulate", model, "--system", system, *FLAGS, "--json")
    run = run_main(monkeypatch, capsys, "run", model, "--system", system, *FLAGS, "--out",
                   str(tmp_path / "r"), "--traces", "none", "--json")
    gen = run_main(monkeypatch, capsys, "generate", model, *FLAGS, "--out", str(tmp_path / "g"), "--system", system,
                   "--json")
    assert (sim.returncode, run.returncode, gen.returncode) == (0, 0, 0), (sim.stderr, run.stderr, gen.stderr)
    s, r, g = json.loads(sim.stdout), json.loads(run.stdout), json.loads(gen.stdout)
    assert s["inputs"]["plan"] == r["inputs"]["plan"] == g["inputs"]["plan"]
    assert s["world"] == r["world"] == g["world"] == 1 * 2 * 2
    assert s["inputs"]["plan"]["world"] == 4
    assert s["peak_memory_bytes"] == r["peak_memory_bytes"] == g["peak_memory_bytes"] > 0
    gib = f"{s['peak_memory_bytes'] / 2**30:.2f}"
    # the human outputs print the same plan line
    line = api.describe_plan(api.make_plan(tp=1, pp=2, dp=2, seq=512, global_batch=8))
    for cmd in (["simulate", model, "--system", system, *FLAGS],
                ["run", model, "--system", system, *FLAGS, "--out", str(tmp_path / "r"), "--traces", "none"],
                ["generate", model, *FLAGS, "--out", str(tmp_path / "g"), "--system", system]):
        res = run_main(monkeypatch, capsys, *cmd)
        assert res.returncode == 0, res.stderr
        assert line in res.stdout, (cmd, res.stdout)
        assert gib in res.stdout, (cmd, gib, res.stdout)  # the same peak memory, same format


def test_derived_change_is_one_line_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(monkeypatch, capsys, "simulate", "gpt3-125m", "--system", "dgx-a100-selene", "--tp", "4",
                   "--dp", "2", "--seq", "512", "--json")
    assert res.returncode == 0, res.stderr
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")]
    assert notes and "pp=2 kept from the default plan" in notes[0]
    assert json.loads(res.stdout)["notes"][0] == notes[0].removeprefix("note: ")


def test_example_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["api_tour.py", str(tmp_path / "traces")])
    runpy.run_path(str(ROOT / "examples" / "api_tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "from the traces: step" in out
    assert (tmp_path / "traces" / "manifest.json").is_file()


@pytest.mark.parametrize("cmd", [["simulate", "--system", "dgx-a100-selene"], ["replay"]])
def test_the_default_plan_is_not_a_plan_flag_given_with_trace(cmd: list[str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no-traces")
    res = run_main(monkeypatch, capsys, *cmd, "--trace", missing)  # no plan flags: the trace is looked at
    assert res.returncode == 2 and not res.stderr.startswith("error: plan:"), res.stderr
    res = run_main(monkeypatch, capsys, *cmd, "--trace", missing, "--tp", "2")  # 2 = the default's value
    assert res.returncode == 2 and res.stderr.startswith("error: plan:"), res.stderr
    res = run_main(monkeypatch, capsys, "replay", "--bench", "--tp", "2")
    assert res.returncode == 2 and res.stderr.startswith("error: bench:"), res.stderr
