"""Agents, the study store (resume after an interruption), executors, Pareto fronts, outputs."""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.explore.agents import agent_names
from tensorstage.explore.executors import LocalExecutor, RayExecutor
from tensorstage.explore.search import run_study
from tensorstage.explore.space import load_space, parse_space
from tensorstage.explore.study import pareto_front
from tensorstage.parallel.plan import load_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "spaces"
SMALL = {"model": "megatron-1.7b", "system": "dgx-a100-selene", "gpus": 16,
         "fixed": {"seq": 2048, "global_batch": 64, "dtype": "fp16"},
         "parameters": {"plan": {"tp": {"pow2": [1, 8]}, "pp": {"pow2": [1, 4]}, "micro_batch": [1, 2],
                                 "recompute": ["selective", "full"]}},
         "derived": {"dp": "gpus // (tp * pp)", "sp": "tp > 1"},
         "constraints": ["tp * pp * dp == gpus", "global_batch % (dp * micro_batch) == 0"],
         "objectives": [{"metric": "step_time_s", "goal": "min"}, {"metric": "peak_memory_bytes", "goal": "min"}]}


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    pts = rng.integers(0, 6, size=(60, 2)).astype(float)
    front = set(pareto_front(pts).tolist())
    brute = {i for i, p in enumerate(pts)
             if not any((q <= p).all() and (q < p).any() for j, q in enumerate(pts) if j != i)}
    assert front == brute


@pytest.mark.parametrize("agent", ["grid", "random", "random_walk", "aco", "ga", "nsga2", "tpe"])
def test_every_agent_runs_and_is_deterministic(agent):
    sp = parse_space(SMALL)
    a = run_study(sp, agent, 6, None, seed=1, evaluator="fast")
    b = run_study(sp, agent, 6, None, seed=1, evaluator="fast")
    assert a.evaluations == 6
    assert [(t.key, t.status, t.objectives) for t in a.trials] == [(t.key, t.status, t.objectives) for t in b.trials]
    assert a.best() is not None
    assert set(agent_names()) >= {"grid", "random", "random_walk", "aco", "ga", "nsga2", "tpe"}


def test_ga_and_tpe_near_exhaustive_optimum_in_a_tenth_of_its_evaluations():
    """The enumerable layout space of the example (576 legal layouts, closed-form evaluator): GA
    and TPE get within 5 % of the grid optimum with 10 % of the grid's evaluations."""
    sp = load_space(EXAMPLES / "layouts_18b_64gpu.yaml")
    grid = run_study(sp, "grid", 10**6, None, evaluator="fast", batch=600)
    opt = grid.best().objectives[0]
    n = grid.evaluations // 10
    for agent in ("ga", "tpe"):
        res = run_study(sp, agent, n, None, evaluator="fast", seed=0)
        assert res.evaluations <= n
        assert res.best().objectives[0] <= 1.05 * opt, agent


class _Interrupt(Exception):
    pass


class _CountingExecutor(LocalExecutor):
    """Runs tasks in-process, counts them, and can fail after ``limit`` (a crash mid-batch)."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__(1)
        self.limit, self.calls = limit, 0

    def run(self, tasks):
        for i, r in super().run(tasks):
            self.calls += 1
            yield i, r
            if self.limit is not None and self.calls >= self.limit:
                raise _Interrupt


def test_resume_after_interruption_loses_and_redoes_nothing(tmp_path):
    sp = parse_space({**SMALL, "objectives": SMALL["objectives"][:1]})
    first = _CountingExecutor(limit=5)
    with pytest.raises(_Interrupt):
        run_study(sp, "random", 8, tmp_path, seed=2, batch=4, executor=first, evaluator="full")
    done = first.calls
    second = _CountingExecutor()
    res = run_study(sp, "random", 8, tmp_path, seed=2, batch=4, executor=second, evaluator="full")
    assert res.evaluations == 8
    assert second.calls == 8 - done  # the finished ones came back from the store
    fresh = run_study(sp, "random", 8, None, seed=2, batch=4, evaluator="full")
    assert [(t.number, t.key, t.status, t.objectives) for t in res.trials] == \
           [(t.number, t.key, t.status, t.objectives) for t in fresh.trials]


def test_resume_does_not_count_screen_pruned_trials(tmp_path):
    # 7.5B on 8 GPUs: TP1/TP2 need several times the HBM (pruned by the screen, never simulated)
    data = {"model": "megatron-7.5b", "system": "dgx-a100-selene", "gpus": 8,
            "fixed": {"seq": 2048, "global_batch": 16, "dtype": "fp16", "recompute": "full"},
            "parameters": {"plan": {"tp": {"pow2": [1, 8]}, "micro_batch": [1, 2]}},
            "derived": {"dp": "gpus // tp", "sp": "tp > 1"},
            "constraints": ["global_batch % (dp * micro_batch) == 0"],
            "objectives": [{"metric": "step_time_s", "goal": "min"}]}
    sp = parse_space(data)
    first = run_study(sp, "grid", 3, tmp_path, batch=8, executor=_CountingExecutor(), evaluator="screened")
    pruned = [t for t in first.trials if t.status == "pruned"]
    assert pruned and all(t.source == "fast" for t in pruned)
    again = _CountingExecutor()
    second = run_study(sp, "grid", 3, tmp_path, batch=8, executor=again, evaluator="screened")
    assert second.evaluations == first.evaluations and again.calls == 0


def test_resume_refuses_a_different_study(tmp_path):
    sp = parse_space(SMALL)
    run_study(sp, "random", 2, tmp_path, evaluator="fast")
    with pytest.raises(Exception, match="different agent"):
        run_study(sp, "grid", 2, tmp_path, evaluator="fast")


def test_ray_executor_logic_with_an_in_process_ray(monkeypatch):
    """RayExecutor's submit / wait / get / shutdown sequence against a minimal in-process stand-in
    for the ``ray`` module (a real two-worker cluster is exercised by ``bench/bench_explore_ray.py``;
    starting one takes ~20 s on two cores, too slow for the unit tests)."""
    calls: list[str] = []

    class Ref:
        def __init__(self, value):
            self.value = value

    def remote(fn):
        return types.SimpleNamespace(remote=lambda t: Ref(fn(t)))

    fake = types.SimpleNamespace(
        is_initialized=lambda: False, init=lambda **kw: calls.append(f"init {sorted(kw)}"), remote=remote,
        wait=lambda refs, num_returns: (refs[::-1][:num_returns], [r for r in refs[::-1][num_returns:]][::-1]),
        get=lambda ref: ref.value, shutdown=lambda: calls.append("shutdown"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    sp = parse_space({**SMALL, "objectives": SMALL["objectives"][:1]})
    ex = RayExecutor(None, 2)
    via_ray = run_study(sp, "random", 4, None, seed=5, executor=ex, evaluator="full")
    ex.close()
    local = run_study(sp, "random", 4, None, seed=5, evaluator="full")
    assert calls[0].startswith("init") and "num_cpus" in calls[0] and calls[-1] == "shutdown"
    assert [(t.number, t.key, t.objectives) for t in via_ray.trials] == \
           [(t.number, t.key, t.objectives) for t in local.trials]


def test_cli_explore_writes_outputs_and_a_plan_simulate_runs(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SMALL, "budget": 4}, sort_keys=False))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["explore", str(space), "--agent", "nsga2", "--out", str(out), "--evaluator", "fast"])
    assert res.exit_code == 0, res.output
    for name in ("trials.csv", "pareto.csv", "sensitivity.csv", "summary.json", "convergence.png",
                 "best_plan.yaml", "study.sqlite"):
        assert (out / name).is_file(), name
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".sqlite"}
    # re-running resumes the stored study: nothing new to evaluate, byte-identical outputs
    assert runner.invoke(app, ["explore", str(space), "--agent", "nsga2", "--out", str(out),
                               "--evaluator", "fast"]).exit_code == 0
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".sqlite"}
    assert before == after
    plan = load_plan(out / "best_plan.yaml")
    assert plan.world == 16
    sim = runner.invoke(app, ["simulate", "megatron-1.7b", "--system", "dgx-a100-selene", "-c",
                              str(out / "best_plan.yaml"), "--json"])
    assert sim.exit_code == 0, sim.output
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,status,source,tp,pp,micro_batch,recompute,dp,sp,objective:step_time_s")
    assert len(rows) - 1 >= 4


def test_cli_best_plan_small_model(tmp_path):
    out = tmp_path / "best.yaml"
    res = CliRunner().invoke(app, ["best-plan", "megatron-1.7b", "--system", "dgx-a100-selene", "--gpus", "8",
                                   "--global-batch", "16", "--seq", "2048", "--top", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = load_plan(out)
    assert plan.world == 8
    bad = CliRunner().invoke(app, ["best-plan", "megatron-1.7b", "--system", "dgx-a100-selene", "--gpus", "8",
                                   "--global-batch", "16", "--objective", "speed"])
    assert bad.exit_code != 0 and bad.exception.field == "objective"


def test_network_and_device_parameters_change_the_system():
    data = {**SMALL, "parameters": {"plan": {"tp": [8]}, "network": {"ib.bandwidth_GBps": [12.5, 50.0]},
                                    "hardware": {"device": ["A100-80GB", "H100-SXM"]}},
            "derived": {"dp": "gpus // 8", "pp": 1}, "objectives": SMALL["objectives"][:1]}
    sp = parse_space(data)
    res = run_study(sp, "grid", 4, None, evaluator="fast")
    by = {(t.params["ib.bandwidth_GBps"], t.params["device"]): t.objectives[0] for t in res.trials}
    assert len(by) == 4
    for dev, bw in itertools.product(["A100-80GB", "H100-SXM"], [12.5]):
        assert by[(bw, dev)] > by[(50.0, dev)]  # slower DP all-reduce across nodes
    assert by[(50.0, "H100-SXM")] < by[(50.0, "A100-80GB")]


class FirstFeasibleAgent:
    """A user plug-in: proposes index vectors in row-major order (the ask/tell contract, nothing else)."""

    name = "first"

    def __init__(self, space, seed, n_objectives):
        self.rows = itertools.product(*(range(n) for n in space.sizes))
        self.told = 0

    def ask(self, n):
        return list(itertools.islice(self.rows, n))

    def tell(self, results):
        self.told += len(results)


def test_plug_in_agent_by_module_and_class():
    sp = parse_space({**SMALL, "objectives": SMALL["objectives"][:1]})
    res = run_study(sp, f"{__name__}:FirstFeasibleAgent", 3, None, evaluator="fast")
    assert res.evaluations == 3
    assert res.trials[0].params["tp"] == 1 and res.trials[0].params["pp"] == 1
    with pytest.raises(Exception, match="cannot load plug-in"):
        run_study(sp, "no_such_module_xyz:Agent", 1, None, evaluator="fast")


def test_penalty_is_finite_before_any_feasible_result():
    from tensorstage.explore.agents.base import penalised

    worst = [float("-inf"), float("-inf")]
    assert all(np.isfinite(penalised(None, worst)))
    penalised((2.0, -3.0), worst)
    assert penalised(None, worst) == [5.0, 1.0]  # above the worst seen: w + |w| + 1


def test_best_plan_layouts_split_uneven_stages_also_when_pp_is_pinned():
    from tensorstage.explore.bestplan import balanced_split, layout_space, screen_layouts

    assert balanced_split(126, 16) == (7, *[8] * 14, 7)  # Llama 3 405B's 126 layers on 16 stages
    assert balanced_split(24, 5) == (5, 5, 5, 5, 4)  # middle stages first, then the first (the last holds the head)
    for fixed in (None, {"tp": 1, "pp": 16}):
        sp = layout_space("megatron-1.7b", "dgx-a100-selene", 16, 64, 2048, "fp16", fixed)
        tasks, _, _ = screen_layouts(sp)
        split = [t.plan["pp_layer_split"] for t in tasks if t.plan.get("pp", sp.fixed.get("pp")) == 16]
        assert split and all(tuple(s) == balanced_split(24, 16) for s in split)
