"""``best-plan --fix KEY=VALUE`` and the per-field check of a space's ``fixed`` values."""

from __future__ import annotations

import json

import pytest
from support import run_main
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.commands.explore import pinned_fields
from tensorstage.errors import SpecError
from tensorstage.explore.space import parse_space
from tensorstage.hardware import load_system
from tensorstage.parallel.plan import ParallelPlan

BASE = ["best-plan", "megatron-1.7b", "--system", "dgx-a100-selene", "--gpus", "8", "--global-batch", "16",
        "--seq", "2048", "--top", "3"]


def test_pinned_fields_are_what_every_simulated_layout_runs():
    res = CliRunner().invoke(app, [*BASE, "--fix", "zero=0", "--fix", "recompute=full", "--fix", "tp=2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ranking"], out
    for row in out["ranking"]:
        assert (row["tp"], row["zero"], row["recompute"]) == (2, 0, "full")
    assert out["best_plan"]["zero"] == 0 and out["best_plan"]["recompute"] == "full"
    # the ranking carries each layout's simulated peak memory, under the HBM exactly when it fits
    hbm_gib = load_system("dgx-a100-selene", 8).device.hbm_bytes / 2**30
    for row in out["ranking"]:
        assert row["peak_memory_GiB"] is not None and (row["peak_memory_GiB"] <= hbm_gib) == (row["status"] == "ok"), row
    # unpinned, the same search is free to pick other values (so the pins above did something)
    free = json.loads(CliRunner().invoke(app, [*BASE, "--top", "8", "--json"]).output)
    assert {(r["tp"], r["zero"], r["recompute"]) for r in free["ranking"]} != {(2, 0, "full")}


@pytest.mark.parametrize("items, field, words", [
    (["zero"], "--fix", "KEY=VALUE"),
    (["=1"], "--fix", "KEY=VALUE"),
    (["seq=4096"], "--fix", "--seq"),
    (["global_batch=8"], "--fix", "--global-batch"),
    (["tp=8", "tp=4"], "--fix", "twice"),
    (["foo=1"], "--fix.foo", "unknown plan key"),
    (["zero=7"], "--fix.zero", "0, 1, 2, 3"),
    (["recompute=some"], "--fix.recompute", "selective"),
    (["sp=maybe"], "--fix.sp", "true, false"),
    (["tp=abc"], "--fix.tp", "integer"),
])
def test_bad_fix_is_one_line_naming_the_field(items, field, words):
    with pytest.raises(SpecError) as err:
        pinned_fields(items)
    assert err.value.field == field and words in str(err.value)
    args = [a for it in items for a in ("--fix", it)]
    res = CliRunner().invoke(app, [*BASE, *args])
    assert isinstance(res.exception, SpecError) and res.exception.field == field


def test_bad_fix_exits_2_with_one_line(monkeypatch, capsys):
    r = run_main(monkeypatch, capsys, *BASE, "--fix", "zero=7")
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--fix.zero" in lines[0], r.stderr


def test_values_are_read_as_yaml_and_coerced_as_their_field():
    got = pinned_fields(["sp=false", "zero=1", "pp_layer_split=[3, 5]", "recompute=selective",
                         "overlap_grad_reduce=no"])
    assert got == {"sp": False, "zero": 1, "pp_layer_split": (3, 5), "recompute": "selective",
                   "overlap_grad_reduce": False}
    # sp is kept as given (its validator drops sp only beside tp == 1, which the probe is not)
    assert ParallelPlan.check_field("sp", "true") is True


def test_space_file_fixed_values_are_checked_one_line():
    data = {"model": "megatron-1.7b", "system": "dgx-a100-selene", "gpus": 8,
            "fixed": {"seq": 2048, "global_batch": 16, "zero": 5},
            "parameters": {"plan": {"tp": [1, 2]}}, "derived": {"dp": "gpus // tp"},
            "objectives": [{"metric": "step_time_s", "goal": "min"}]}
    with pytest.raises(SpecError) as err:
        parse_space(data, where="space")
    assert err.value.field == "space.fixed.zero"
    data["fixed"]["zero"] = "1"  # not an int: Literal[0, 1, 2, 3] does not parse strings
    with pytest.raises(SpecError):
        parse_space(data, where="space")
    data["fixed"]["zero"] = 1
    data["fixed"]["sp"] = "false"
    assert parse_space(data, where="space").fixed["sp"] is False


@pytest.mark.parametrize("fix, words", [
    (["tp=3"], "gpus % (tp * pp * cp) == 0"),             # no TP of 3 divides 8 GPUs
    (["tp=8", "pp=8", "dp=2"], "gpus % (tp * pp * cp)"),  # 128 ranks on 8 GPUs
])
def test_no_legal_layout_is_an_error_with_its_reason(fix, words, monkeypatch, capsys):
    r = run_main(monkeypatch, capsys, *BASE, *[a for f in fix for a in ("--fix", f)])
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fixed: no legal layout") and words in lines[0], r.stderr


def test_context_parallel_can_be_pinned():
    res = CliRunner().invoke(app, [*BASE, "--fix", "cp=2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ranking"] and all(r["cp"] == 2 and r["tp"] * r["pp"] * r["dp"] * 2 == 8 for r in out["ranking"])


def test_own_options_are_named_as_options():
    res = CliRunner().invoke(app, ["best-plan", "megatron-1.7b", "--system", "dgx-a100-selene", "--gpus", "8",
                                   "--global-batch", "16", "--dtype", "fp7"])
    assert isinstance(res.exception, SpecError) and res.exception.field == "dtype"


def test_fields_the_plan_pre_pass_rewrites_are_accepted_as_in_a_plan_file():
    # YAML false for fsdp_reshard_after_forward, comma strings for rank_order / pp_layer_split /
    # recompute_modules: what a plan YAML accepts, --fix and a space's fixed values accept too
    got = pinned_fields(["fsdp_reshard_after_forward=false", "rank_order=tp,dp,pp,cp", "pp_layer_split=12,12",
                         "recompute_modules=mlp,mlp"])
    assert got == {"fsdp_reshard_after_forward": "false", "rank_order": ("tp", "dp", "pp", "cp"),
                   "pp_layer_split": (12, 12), "recompute_modules": ("mlp",)}
    sp = parse_space({"model": "megatron-1.7b", "system": "dgx-a100-selene", "gpus": 8,
                      "fixed": {"seq": 2048, "global_batch": 16, "zero": 3, "fsdp_reshard_after_forward": False},
                      "parameters": {"plan": {"tp": [1, 2]}}, "derived": {"dp": "gpus // tp"}})
    assert sp.fixed["fsdp_reshard_after_forward"] == "false"


def test_a_network_value_is_checked_as_its_dimension_alone():
    """Whether an npus fits the GPU count depends on the other dimensions' searched values: only the
    value's own domain is checked up front (a COSMIC-style 4-D system, pod x leaf searched together)."""
    from pathlib import Path

    system = str(Path(__file__).resolve().parents[1] / "examples" / "systems" / "cosmic-4d-a100.yaml")
    data = {"model": "gpt3-1.3b", "system": system, "gpus": 128, "fixed": {"seq": 2048, "global_batch": 128},
            "parameters": {"plan": {"tp": [1, 8]}, "network": {"pod.npus": [2, 4, 8], "leaf.npus": [1, 2, 4]}},
            "derived": {"dp": "gpus // tp"}}
    assert parse_space(data).grid_size == 18


def test_memory_reserve_turns_layouts_over_the_reduced_limit_out_of_memory():
    """``--memory-reserve-gib R``: a layout whose simulated peak fits the HBM but not HBM - R is ``oom``
    (what the CUDA context, NCCL buffers and fragmentation need is not modelled: the user reserves it)."""
    hbm_gib = load_system("dgx-a100-selene", 8).device.hbm_bytes / 2**30
    free = json.loads(CliRunner().invoke(app, [*BASE, "--json"]).output)
    peaks = sorted(r["peak_memory_GiB"] for r in free["ranking"] if r["status"] == "ok")
    assert len(peaks) >= 2 and peaks[0] < peaks[-1]
    limit = (peaks[0] + peaks[-1]) / 2  # between the smallest and the largest simulated peak
    res = CliRunner().invoke(app, [*BASE, "--json", "--memory-reserve-gib", str(hbm_gib - limit)])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["ranking"]
    for row in got["ranking"]:
        assert (row["peak_memory_GiB"] <= limit) == (row["status"] == "ok"), (row, limit)
    assert any(r["status"] == "oom" for r in got["ranking"])
    best = [r for r in got["ranking"] if r["status"] == "ok"][0]
    assert best["peak_memory_GiB"] <= limit < peaks[-1]


@pytest.mark.parametrize("value", ["-1", "nan", "80", "1000"])
def test_bad_memory_reserve_exits_2_with_one_line(monkeypatch, capsys, value):
    r = run_main(monkeypatch, capsys, *BASE, "--memory-reserve-gib", value)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "memory" in lines[0] and "reserve" in lines[0], r.stderr
