"""Space files: safe expressions, parameter ranges, one-line errors naming the parameter."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.errors import SpecError
from tensorstage.explore.expr import compile_expr
from tensorstage.explore.space import load_space, parse_space

BASE = {"model": "megatron-1.7b", "system": "dgx-a100-selene", "gpus": 16,
        "fixed": {"seq": 2048, "global_batch": 64},
        "parameters": {"plan": {"tp": {"pow2": [1, 8]}, "pp": {"pow2": [1, 4]}, "micro_batch": [1, 2]}},
        "derived": {"dp": "gpus // (tp * pp)"},
        "constraints": ["tp * pp * dp == gpus", "divides(tp, model.num_heads)"]}


def test_expressions_scalar_and_vectorised():
    e = compile_expr("a * b if a > 1 and not flag else max(a, b, 7) - 1", "x")
    assert e({"a": 2, "b": 3, "flag": False}) == 6
    assert e({"a": 1, "b": 3, "flag": False}) == 6
    out = e({"a": np.array([1, 2, 3]), "b": np.array([9, 9, 9]), "flag": np.array([False, False, True])})
    assert out.tolist() == [8, 18, 8]
    assert e.names == {"a", "b", "flag"}
    # a zero divisor fails the constraint instead of raising
    c = compile_expr("64 % (dp * 2) == 0", "c")
    assert not bool(c({"dp": 0}))
    assert c({"dp": np.array([0, 4, 3])}).tolist() == [False, True, False]


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "(lambda: 1)()", "[1, 2]",
                                  "x.__class__.__mro__", "open('f')", "a[0]"])
def test_expressions_reject_anything_but_arithmetic(text):
    with pytest.raises(SpecError) as err:
        compile_expr(text, "space.constraints[0]")(
            {"x": 1, "a": [1], "x.__class__.__mro__": 0})
    assert str(err.value).startswith("space.constraints[0]:")


def test_ranges_and_enumeration_agree_with_scalar_check():
    data = {**BASE, "parameters": {"plan": {**BASE["parameters"]["plan"]},
                                   "network": {"ib.bandwidth_GBps": {"float": [25, 100], "steps": 4}}}}
    sp = parse_space(data)
    assert [p.values for p in sp.parameters[:2]] == [(1, 2, 4, 8), (1, 2, 4)]
    assert sp.parameters[3].values == (25.0, 50.0, 75.0, 100.0)
    assert sp.grid_size == 4 * 3 * 2 * 4
    idx = sp.enumerate_indices()
    mask, _ = sp.feasible_mask(idx)
    scalar = [sp.feasible(sp.decode(tuple(int(v) for v in row)))[0] for row in idx]
    assert mask.tolist() == scalar
    # 16 GPUs: every (tp, pp) with tp * pp <= 16 (all but tp 8 x pp 4) leaves an integer dp, and
    # every tp divides the 24 heads: 11 layouts x 2 micro-batches x 4 bandwidths
    assert mask.sum() == 11 * 2 * 4
    assert sp.decode((3, 1, 0, 0))["dp"] == 1


@pytest.mark.parametrize("change, field", [
    ({"parameters": {"plan": {"tpp": [1, 2]}}}, "space.parameters.plan.tpp"),
    ({"parameters": {"plan": {"tp": {"pow2": [1, 6]}}}}, "space.parameters.plan.tp"),
    ({"parameters": {"plan": {"tp": {"int": [4, 1]}}}}, "space.parameters.plan.tp"),
    ({"parameters": {"wires": {"tp": [1]}}}, "space.parameters.wires"),
    ({"parameters": {"network": {"eth.bandwidth_GBps": [1.0]}}}, "space.parameters.network.eth.bandwidth_GBps"),
    ({"parameters": {"collective": {"tp": [1]}}}, "space.parameters.collective.tp"),
    ({"constraints": ["tp * pipes == gpus"]}, "space.constraints[0]"),
    ({"derived": {"dp": "import os"}}, "space.derived.dp"),
    ({"objectives": [{"metric": "speed"}]}, "space.objectives[0].metric"),
    ({"budget": 0}, "space.budget"),
    ({"gpus": "many"}, "space.gpus"),
])
def test_bad_spaces_name_the_parameter(change, field):
    with pytest.raises(SpecError) as err:
        parse_space({**BASE, **change})
    assert err.value.field == field


def test_cli_bad_space_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("model: megatron-1.7b\nsystem: dgx-a100-selene\ngpus: 8\nparameters:\n  plan:\n"
                   "    tp: {pow2: [1, 3]}\n")
    res = CliRunner().invoke(app, ["explore", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert isinstance(res.exception, SpecError)
    assert res.exception.field == "s.yaml.parameters.plan.tp"
    assert "\n" not in str(res.exception)
    with pytest.raises(SpecError):
        load_space(tmp_path / "missing.yaml")


def test_shipped_examples_load_and_set_the_4d_network():
    from pathlib import Path

    from tensorstage.explore.setup import build_system, make_task

    root = Path(__file__).resolve().parents[1] / "examples" / "spaces"
    for f in sorted(root.glob("*.yaml")):
        assert load_space(f).parameters, f
    sp = load_space(root / "cosmic_gpt3_175b_1024.yaml")  # its system path is relative to the file
    cfg = sp.decode(tuple(0 for _ in sp.parameters))
    cfg.update({"tp": 8, "pp": 8, "dp": 16, "pod.npus": 4, "leaf.npus": 8, "spine.bandwidth_GBps": 50.0})
    assert sp.feasible(cfg)[0]
    task = make_task(sp.model, sp.system, sp.gpus, sp.fixed, cfg)
    system = build_system(*task.system_key())
    dims = {d.name: d for d in system.network}
    assert [d.npus for d in system.network] == [8, 4, 8, 1024 // (8 * 4 * 8)]
    assert dims["spine"].bandwidth_GBps == 50.0 and dims["pod"].bandwidth_GBps == 12.5
