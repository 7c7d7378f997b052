"""Executors start the costliest tasks first and still return every result under its position."""

from __future__ import annotations

from tensorstage.explore.evaluate import training_step, work_estimate
from tensorstage.explore.executors import LocalExecutor, submit_order
from tensorstage.explore.setup import Task


def _task(**plan: object) -> Task:
    base = {"seq": 512, "dtype": "bf16", "tp": 1, "pp": 1, "dp": 1, "micro_batch": 1}
    return Task("gpt3-125m", "dgx-a100-selene", 4, {**base, **plan})


def _double(task: Task) -> dict:
    return {"status": "ok", "value": 2 * task.plan["global_batch"]}


def test_work_estimate_counts_block_instances_simulated():
    # gpt3-125m has 12 layers. PP 2 x DP 2 with 8 micro-batches: below the steady-state threshold
    # (3 x (m3 + 2) = 3 x (6 + 2) = 24 for k = 2: m1 = 2 + 2 = 4, m3 = 6), so all 8 are simulated.
    assert work_estimate(_task(pp=2, dp=2, global_batch=16)) == 12 * 8
    # 64 micro-batches qualify: the three short runs of 4, 5 and 6 micro-batches are simulated.
    assert work_estimate(_task(pp=2, dp=2, global_batch=128)) == 12 * (4 + 5 + 6)
    # a plan that does not parse (global batch 5 over DP 2) costs nothing to reject
    assert work_estimate(_task(pp=2, dp=2, global_batch=5)) == 0.0


def test_submit_order_costliest_first_ties_in_position_order():
    tasks = [_task(global_batch=b) for b in (4, 16, 8, 16)]
    assert submit_order(tasks, _double, lambda t: t.plan["global_batch"]) == [1, 3, 2, 0]
    assert submit_order(tasks, _double, None) == [0, 1, 2, 3]  # no estimate for a custom evaluator
    legal = [_task(pp=2, dp=2, global_batch=16), _task(pp=2, dp=2, global_batch=128)]
    assert submit_order(legal, training_step, None) == [1, 0]  # the training evaluator's default


def test_pool_returns_results_by_position_whatever_the_start_order():
    tasks = [_task(global_batch=b) for b in (4, 32, 8, 16, 2)]
    ex = LocalExecutor(2, _double, lambda t: t.plan["global_batch"])
    got = dict(ex.run(tasks))
    ex.close()
    assert got == {i: {"status": "ok", "value": 2 * t.plan["global_batch"]} for i, t in enumerate(tasks)}


def test_best_plan_on_a_pool_is_the_one_at_a_time_result():
    from tensorstage.explore.bestplan import best_plan

    args = ("megatron-1.7b", "dgx-a100-selene", 8, 16, 2048)
    one = best_plan(*args, top=3)
    two = best_plan(*args, top=3, workers=2)
    assert [(r.plan, r.status, r.full) for r in one.simulated] == [(r.plan, r.status, r.full) for r in two.simulated]
    assert one.best is not None and one.best.plan == two.best.plan
