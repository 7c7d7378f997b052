"""The search loop: an agent asks, the space checks, the pre-screen prunes, an executor evaluates,
the store keeps every trial, the agent is told.

Budget counts evaluations that cost a simulation (``full``) or a screen (``fast``); configurations
rejected by a constraint, pruned by the screen or already in the store are told to the agent
without spending budget (a cap on asks stops an agent that only proposes those).

Evaluators (``Space.evaluator`` or the ``evaluator`` argument):

* ``full``: every feasible configuration is simulated (:func:`.evaluate.training_step`);
* ``fast``: the closed-form screen (:mod:`.fastpath`) is the result;
* ``screened`` (default): screened first; configurations the screen predicts out of memory by more
  than :data:`PRUNE_MEMORY_FRACTION` are pruned, the rest simulated in full.

Resume: a study re-run with the same ``out`` folder, space, agent and seed replays the stored
trials through a fresh agent (same asks, same answers), then continues; nothing finished is redone.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.explore.agents import Told, make_agent
from tensorstage.explore.evaluate import OK, OOM, PRUNED
from tensorstage.explore.executors import LocalExecutor, RayExecutor
from tensorstage.explore.setup import Task, build_system, config_key, make_task
from tensorstage.explore.space import Space
from tensorstage.explore.study import Trial, TrialStore

#: Screened configurations predicted to need more than this fraction of HBM are not simulated.
#: Above 1 because the screen's memory is an estimate (within ~2 % of the simulator's peak on
#: the plans checked in ``bench/bench_explore.py``); the simulator has the last word.
PRUNE_MEMORY_FRACTION = 1.10
#: Asks per unit of budget before the loop gives up on an agent that proposes nothing new. The loop
#: also ends once every point of the space has been proposed (a budget larger than the space).
ASK_CAP_FACTOR = 50
#: Grids up to this size have their parameter constraints checked over every configuration before
#: a study starts (a vectorised pass, well under a second), so a space that admits nothing is an error.
FEASIBILITY_CHECK_MAX = 1_000_000
#: Largest seed every agent accepts (numpy's and optuna's generators take 32-bit seeds).
MAX_SEED = 2**32 - 1
STORE_NAME = "study.sqlite"


@dataclass
class StudyResult:
    """What a finished (or interrupted and resumed) study holds."""

    space: Space
    agent: str
    trials: list[Trial]
    evaluations: int

    def feasible(self) -> list[Trial]:
        return [t for t in self.trials if t.status == OK and t.objectives is not None]

    def best(self) -> Trial | None:
        """The feasible trial with the best first objective (ties: lowest number)."""
        ok = self.feasible()
        if not ok:
            return None
        sign = self.space.objectives[0].sign()
        return min(ok, key=lambda t: (sign * t.objectives[0], t.number))  # type: ignore[index]


def space_digest(space: Space) -> str:
    """A short hash of what defines a study's trials (a store is resumed only under the same one)."""
    data = {"model": space.model, "system": space.system, "gpus": space.gpus, "fixed": space.fixed,
            "parameters": [(p.stack, p.name, p.kind, list(map(str, p.values))) for p in space.parameters],
            "derived": {k: v.text for k, v in space.derived.items()},
            "constraints": [c.text for c in space.constraints],
            "objectives": [(o.name, o.goal, o.expr.text) for o in space.objectives]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def objective_values(space: Space, cfg: dict[str, Any], metrics: dict[str, float]) -> list[float]:
    env = {**space.env(cfg), **metrics}
    return [float(o.expr(env)) for o in space.objectives]


class _Runner:
    def __init__(self, space: Space, store: TrialStore, executor: LocalExecutor | RayExecutor, evaluator: str) -> None:
        self.space, self.store, self.executor, self.evaluator = space, store, executor, evaluator
        # what the live loop counts (batch): every full simulation and every scored screen result; a
        # screen-pruned trial is stored with source "fast" but was never an evaluation
        self.evaluations = sum(1 for t in store.trials()
                               if t.source == "full" or (t.source == "fast" and t.status != PRUNED))

    def _finish(self, number: int, cfg: dict[str, Any], task: Task, res: dict[str, Any], source: str) -> Trial:
        status, metrics = res["status"], res["metrics"]
        objectives = None
        if status == OK:
            env = {**self.space.env(cfg), **metrics}
            failed = [c.text for c in self.space.post_constraints() if not bool(c(env))]
            if failed:
                status, res = "infeasible", {**res, "message": f"constraint {failed[0]!r}"}
            else:
                objectives = objective_values(self.space, cfg, metrics)
        t = Trial(number, task.key, cfg, status, source, metrics, objectives, res.get("message", ""),
                  float(res.get("wall_s", 0.0)))
        self.store.add(t)
        return t

    def batch(self, first_number: int, indices: list[tuple[int, ...]]) -> list[Trial]:
        """Evaluate one asked batch; trial ``first_number + i`` is ``indices[i]``."""
        sp = self.space
        out: dict[int, Trial] = {}
        todo: list[tuple[int, dict[str, Any], Task]] = []
        first_of: dict[str, int] = {}
        repeats: dict[int, int] = {}
        for i, idx in enumerate(indices):
            cfg = sp.decode(idx)
            key = config_key(cfg)
            if key in self.store.by_key:
                out[i] = self.store.by_key[key]
                continue
            if key in first_of:  # asked twice in one batch: evaluate once
                repeats[i] = first_of[key]
                continue
            first_of[key] = i
            task = make_task(sp.model, sp.system, sp.gpus, sp.fixed, cfg)
            ok, why = sp.feasible(cfg)
            if not ok:
                out[i] = self._finish(first_number + i, cfg, task, {"status": "infeasible", "metrics": {},
                                                                     "message": f"constraint {why!r}"}, "constraint")
                continue
            todo.append((i, cfg, task))
        if todo and self.evaluator in ("fast", "screened"):
            fast = screen_tasks([t for _, _, t in todo])
            keep = []
            for (i, cfg, task), res in zip(todo, fast, strict=True):
                if self.evaluator == "fast" and res["status"] == OK and res["metrics"]["memory_fraction"] > 1.0:
                    res = {**res, "status": OOM, "message": f"screen: {res['metrics']['memory_fraction']:.2f} x HBM"}
                    out[i] = self._finish(first_number + i, cfg, task, res, "fast")
                    self.evaluations += 1
                elif self.evaluator == "fast" or res["status"] != OK:
                    out[i] = self._finish(first_number + i, cfg, task, res, "fast" if res["status"] == OK else "constraint")
                    self.evaluations += res["status"] == OK
                elif res["metrics"]["memory_fraction"] > PRUNE_MEMORY_FRACTION:
                    res = {**res, "status": PRUNED,
                           "message": f"screen: {res['metrics']['memory_fraction']:.2f} x HBM"}
                    out[i] = self._finish(first_number + i, cfg, task, res, "fast")
                else:
                    keep.append((i, cfg, task))
            todo = keep
        if todo:
            for j, res in self.executor.run([t for _, _, t in todo]):
                i, cfg, task = todo[j]
                out[i] = self._finish(first_number + i, cfg, task, res, "full")
                self.evaluations += 1
        for i, j in repeats.items():
            out[i] = out[j]
        return [out[i] for i in range(len(indices))]


def screen_tasks(tasks: list[Task]) -> list[dict[str, Any]]:
    """Closed-form results for tasks (grouped by system); illegal plans come back ``infeasible``."""
    from tensorstage.explore.fastpath import screen
    from tensorstage.explore.setup import task_plan
    from tensorstage.model import resolve_model

    results: list[dict[str, Any] | None] = [None] * len(tasks)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        try:
            plan = task_plan(t)
            plan.validate_for(resolve_model(t.model), t.gpus)
        except SpecError as exc:
            results[i] = {"status": "infeasible", "metrics": {}, "message": str(exc), "wall_s": 0.0}
            continue
        groups.setdefault(t.system_key(), []).append(i)
    for key, idx in groups.items():
        t0 = tasks[idx[0]]
        system = build_system(*key)
        plans = [task_plan(tasks[i]) for i in idx]
        cols = {f: np.array([getattr(p, f) for p in plans]) for f in _screen_fields()}
        m = screen(t0.model, system, cols, len(idx))
        for j, i in enumerate(idx):
            results[i] = {"status": OK, "metrics": {k: float(v[j]) for k, v in m.items()}, "message": "", "wall_s": 0.0}
    return results  # type: ignore[return-value]


def _screen_fields() -> tuple[str, ...]:
    from tensorstage.explore.fastpath import SCREEN_FIELDS

    return SCREEN_FIELDS


def _check_some_configuration_feasible(space: Space) -> None:
    """A one-line ``SpecError`` before anything runs when the space's parameter constraints admit no
    configuration at all (naming the first constraint no configuration meets, if one alone does it);
    checked over the whole grid when it is small enough to do so at once (else the search finds out
    trial by trial)."""
    pre = space.pre_constraints()
    if not pre or space.grid_size > FEASIBILITY_CHECK_MAX:
        return
    mask, cols = space.feasible_mask(space.enumerate_indices())
    if mask.any():
        return
    env = space.env(cols)
    alone = [c.text for c in pre if not np.asarray(c(env), dtype=bool).any()]
    why = f"{alone[0]!r} holds for none of them" if alone else "no configuration meets all of them together"
    raise SpecError("constraints", f"none of the space's {space.grid_size:,} configurations is feasible: {why}")


def run_study(space: Space, agent: str, budget: int | None = None, out: str | Path | None = None, *,
              seed: int = 0, batch: int = 8, executor: LocalExecutor | RayExecutor | None = None,
              evaluator: str | None = None) -> StudyResult:
    """Search ``space`` with ``agent`` for ``budget`` evaluations; trials go to ``out/study.sqlite``
    (an in-memory store when ``out`` is ``None``). Re-running with the same ``out`` resumes."""
    budget = budget or space.budget
    evaluator = evaluator or space.evaluator
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise SpecError("seed", f"must be an integer 0 .. 2**32 - 1 (what numpy and optuna seed), got {seed!r}")
    meta = {"space": space_digest(space), "agent": agent, "seed": str(seed), "evaluator": evaluator,
            "batch": str(batch)}
    ag = make_agent(agent, space, seed)  # an unknown agent fails before any file is written
    _check_some_configuration_feasible(space)
    store = TrialStore(Path(out) / STORE_NAME if out is not None else ":memory:", meta)
    own = executor is None
    executor = executor or LocalExecutor(1)
    runner = _Runner(space, store, executor, evaluator)
    number = 0
    points = math.prod(space.sizes)  # distinct index vectors an agent can propose
    seen: set[tuple[int, ...]] = set()
    try:
        while runner.evaluations < budget and number < ASK_CAP_FACTOR * budget and len(seen) < points:
            want = min(batch, max(1, budget - runner.evaluations))
            idx = ag.ask(want)
            if not idx:  # the agent has nothing new (e.g. a GA that only finds duplicates)
                break
            seen.update(idx)
            trials = runner.batch(number, idx)
            number += len(idx)
            signs = [o.sign() for o in space.objectives]
            ag.tell([Told(i, None if t.objectives is None else tuple(s * v for s, v in zip(signs, t.objectives,
                                                                                            strict=True)))
                     for i, t in zip(idx, trials, strict=True)])
    finally:
        if own:
            executor.close()
    result = StudyResult(space, agent, store.trials(), runner.evaluations)
    store.close()
    return result
