"""Edges of a search a new user meets: a budget larger than the space, bad seeds, constraints that
admit nothing, a study whose every trial is infeasible, and best-plan with nothing that fits."""

from __future__ import annotations

import time

import pytest
from support import run_main

from tensorstage.errors import SpecError
from tensorstage.explore.outputs import convergence
from tensorstage.explore.search import StudyResult, run_study
from tensorstage.explore.space import parse_space

#: 2 x 2 = 4 configurations, all legal
TINY = {"model": "gpt3-125m", "system": "dgx-h100-superpod", "gpus": 8,
        "fixed": {"seq": 1024, "global_batch": 32, "dtype": "bf16"},
        "parameters": {"plan": {"tp": [1, 2], "micro_batch": [1, 2]}},
        "derived": {"dp": "gpus // tp"},
        "objectives": [{"metric": "step_time_s", "goal": "min"}, {"metric": "mfu", "goal": "max"}]}


@pytest.mark.parametrize("agent", ["grid", "random", "random_walk", "aco", "ga", "nsga2", "tpe"])
def test_a_budget_larger_than_the_space_ends_when_every_point_is_seen(agent):
    """Every agent stops at the space's 4 points: no crash (pymoo finds no new offspring), and no
    agent proposing duplicates until the ask cap (50 x budget asks, minutes for TPE)."""
    t0 = time.perf_counter()
    res = run_study(parse_space(TINY), agent, 40, None, seed=3, evaluator="fast")
    assert res.evaluations == 4 and len({t.key for t in res.trials}) == 4
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_bad_seed_is_one_line_naming_it(seed):
    with pytest.raises(SpecError) as err:
        run_study(parse_space(TINY), "random", 2, None, seed=seed, evaluator="fast")
    assert err.value.field == "seed" and "2**32" in str(err.value)


def test_bad_seed_on_the_command_line_exits_2_and_writes_nothing(monkeypatch, capsys, tmp_path):
    import yaml

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    r = run_main(monkeypatch, capsys, "explore", str(space), "--agent", "tpe", "--seed", "99999999999",
                 "--budget", "2", "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "seed" in r.stderr
    assert not out.exists()


def test_constraints_that_admit_nothing_are_an_error_before_anything_runs(monkeypatch, capsys, tmp_path):
    import yaml

    data = {**TINY, "constraints": ["tp * dp == gpus", "tp > 100"]}
    with pytest.raises(SpecError) as err:
        run_study(parse_space(data), "ga", 5, tmp_path / "api", evaluator="fast")
    assert err.value.field == "constraints" and "'tp > 100'" in str(err.value) and "4 configurations" in str(err.value)
    assert not (tmp_path / "api").exists()
    # each alone is met by some configuration, together by none
    data = {**TINY, "constraints": ["tp == 1", "tp == 2"]}
    with pytest.raises(SpecError, match="together"):
        run_study(parse_space(data), "grid", 5, None, evaluator="fast")
    space = tmp_path / "none.yaml"
    space.write_text(yaml.safe_dump({**TINY, "constraints": ["tp > 100"]}))
    r = run_main(monkeypatch, capsys, "explore", str(space), "--budget", "3", "--out", str(tmp_path / "cli"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "constraints" in r.stderr
    assert not (tmp_path / "cli").exists()


def test_convergence_counts_what_the_budget_counts():
    """A screen-pruned trial (stored with source fast, never evaluated) is not an evaluation on the
    convergence plot's axis either."""
    from tensorstage.explore.study import Trial

    sp = parse_space(TINY)
    trials = [Trial(0, "a", {}, "ok", "full", {}, [2.0, 0.1]),
              Trial(1, "b", {}, "pruned", "fast", {}, None),
              Trial(2, "c", {}, "ok", "fast", {}, [1.0, 0.2]),
              Trial(3, "d", {}, "infeasible", "constraint", {}, None),
              Trial(4, "e", {}, "ok", "full", {}, [3.0, 0.1])]
    x, y = convergence(StudyResult(sp, "grid", trials, 3))
    assert x.tolist() == [1, 2, 3] and y.tolist() == [2.0, 1.0, 1.0]


BEST = ["best-plan", "--system", "dgx-h100-superpod"]


def test_best_plan_with_nothing_that_fits_exits_1_with_a_reason(monkeypatch, capsys):
    # the screen already puts every layout over the HBM: no table, one reason on stderr
    r = run_main(monkeypatch, capsys, *BEST, "llama3-8b", "--gpus", "1", "--global-batch", "8")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "fits in memory" in r.stderr and "more GPUs" in r.stderr
    # simulated layouts that all end out of memory: the table, then the hint to simulate more
    r = run_main(monkeypatch, capsys, *BEST, "qwen3-30b-a3b", "--gpus", "32", "--global-batch", "256", "--seq", "4096",
                 "--top", "2", "--json")
    import json

    ranking = json.loads(r.stdout)["ranking"]
    assert r.returncode == 1 and ranking and {row["status"] for row in ranking} == {"oom"} and "--top" in r.stderr


def test_a_model_file_named_in_a_space_is_found_beside_it(tmp_path, monkeypatch):
    import yaml

    from tensorstage.explore.space import load_space
    from tensorstage.model import resolve_model

    folder = tmp_path / "spaces"
    folder.mkdir()
    (folder / "m125.yaml").write_text(yaml.safe_dump(resolve_model("gpt3-125m").model_dump(mode="json")))
    (folder / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "model": "m125.yaml"}))
    monkeypatch.chdir(tmp_path)  # not the space's folder
    sp = load_space(folder / "tiny.yaml")
    assert sp.model == str((folder / "m125.yaml").resolve())


@pytest.mark.parametrize("objectives, words", [
    ([], "non-empty"),
    ([{"metric": "step_time_s", "goal": "min"}, {"metric": "step_time_s", "goal": "min"}], "twice"),
])
def test_empty_or_repeated_objectives_are_one_line(objectives, words):
    with pytest.raises(SpecError) as err:
        parse_space({**TINY, "objectives": objectives}, where="space")
    assert err.value.field.startswith("space.objectives") and words in str(err.value)


def test_explore_json_prints_the_summary_it_writes(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from tensorstage.cli import app

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    res = CliRunner().invoke(app, ["explore", str(space), "--agent", "grid", "--budget", "3", "--evaluator", "fast",
                                   "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    written = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {k: v for k, v in got.items() if k != "files"} == written
    assert got["evaluations"] == 3 and got["files"]["trials"].endswith("trials.csv")


def test_best_plan_searches_zero_only_where_there_are_data_parallel_ranks():
    """ZeRO shards over dp * cp: at dp * cp = 1 every stage is ZeRO-0, so ZeRO 1/3 there would be
    duplicate rows with the same numbers."""
    from tensorstage.explore.bestplan import layout_space, screen_layouts

    tasks, _, _ = screen_layouts(layout_space("megatron-1.7b", "dgx-a100-selene", 8, 16, 2048, "bf16"))
    plans = [t.plan for t in tasks]
    assert any(p["dp"] == 1 for p in plans) and any(p["zero"] == 3 for p in plans)
    assert all(p["zero"] == 0 for p in plans if p["dp"] * p.get("cp", 1) == 1)


def test_expert_parallelism_on_a_dense_model_is_one_line():
    from tensorstage.explore.bestplan import best_plan

    for key in ("ep", "etp"):
        with pytest.raises(SpecError) as err:
            best_plan("megatron-1.7b", "dgx-a100-selene", 8, 16, 2048, fixed={key: 2})
        assert err.value.field == f"best-plan.fixed.{key}" and "no experts" in str(err.value)
    with pytest.raises(SpecError) as err:
        parse_space({**TINY, "parameters": {"plan": {"tp": [1, 2], "ep": [1, 2]}}}, where="space")
    assert err.value.field == "space.parameters.plan.ep" and "no experts" in str(err.value)


@pytest.mark.parametrize("name", ["global_batch", "seq"])
def test_a_space_names_its_batch_and_sequence(name):
    """The step's work is not guessed from plan defaults: a space without them is one line."""
    data = {**TINY, "fixed": {k: v for k, v in TINY["fixed"].items() if k != name}}
    with pytest.raises(SpecError) as err:
        parse_space(data, where="space")
    assert err.value.field == f"space.fixed.{name}" and "required" in str(err.value)
    # given as a searched parameter instead, it is fine
    parse_space({**data, "parameters": {"plan": {**TINY["parameters"]["plan"], name: [TINY["fixed"][name]]}}})


def test_an_unreachable_ray_address_is_one_line_not_a_hang():
    """ray.init retries an unreachable cluster for minutes: the address is checked first."""
    import socket

    from tensorstage.explore.executors import check_reachable

    with socket.socket() as srv:  # a listening port: reachable
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as err:
        check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)  # closed now
    assert err.value.field == "--ray-address" and "cannot reach" in str(err.value)
    assert time.perf_counter() - t0 < 10
    for bad in ("nonsense", "host:", ":123", "host:port"):
        with pytest.raises(SpecError, match="HOST:PORT"):
            check_reachable(bad)
    check_reachable("auto")


def test_unknown_stack_lists_only_the_searchable_ones():
    with pytest.raises(SpecError) as err:
        parse_space({**TINY, "parameters": {"hw": {"device": ["H100"]}}}, where="space")
    assert err.value.field == "space.parameters.hw" and "serving" not in str(err.value)
    assert "plan" in str(err.value) and "hardware" in str(err.value)
    with pytest.raises(SpecError, match="serving evaluator"):
        parse_space({**TINY, "parameters": {"serving": {"replicas": [1, 2]}}}, where="space")
