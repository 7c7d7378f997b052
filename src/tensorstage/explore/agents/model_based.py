"""Agents backed by search packages: GA and NSGA-II (pymoo), TPE (optuna).

They work on the same integer index vectors as the other agents: pymoo sees integer variables
with bounds ``[0, size - 1]`` (SBX crossover and polynomial mutation rounded back to integers,
as pymoo's mixed-integer examples do); optuna sees ``suggest_int`` for ordered parameters and
``suggest_categorical`` for choices. Both packages are imported lazily (the ``explore`` extra).
They may propose a configuration already evaluated; the study answers it from its store without
spending budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorstage.explore.agents.base import Index, Told, penalised, register
from tensorstage.explore.space import Space


class _Pymoo:
    """Generation-wise ask/tell over a pymoo algorithm; ``ask(n)`` hands out a generation piecewise."""

    name = "ga"
    pop_size = 16

    def __init__(self, space: Space, seed: int, n_objectives: int) -> None:
        from pymoo.core.problem import Problem

        self.space = space
        self.n_obj = n_objectives if self.multi else 1
        sizes = np.array(space.sizes)
        self.problem = Problem(n_var=len(sizes), n_obj=self.n_obj, xl=np.zeros(len(sizes)), xu=sizes - 1.0,
                               vtype=int)
        self.algo = self._algorithm()
        self.algo.setup(self.problem, seed=seed, termination=("n_gen", 10**9), verbose=False)
        self.pop: Any = None
        self.pending: list[Index] = []
        self.values: dict[int, list[float]] = {}
        self.handed = 0
        self.worst = [-np.inf] * self.n_obj

    multi = False

    def _operators(self) -> dict[str, Any]:
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling

        return {"sampling": IntegerRandomSampling(),
                "crossover": SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
                "mutation": PM(eta=3.0, vtype=float, repair=RoundingRepair()),
                "eliminate_duplicates": True}

    def _algorithm(self) -> Any:
        from pymoo.algorithms.soo.nonconvex.ga import GA

        return GA(pop_size=self.pop_size, **self._operators())

    def ask(self, n: int) -> list[Index]:
        if self.pop is None:
            pop = self.algo.ask()
            if pop is None or len(pop) == 0:  # pymoo found no offspring that is not a duplicate: the
                return []  # space is exhausted (smaller than the budget), so the search ends
            self.pop = pop
            X = np.clip(np.rint(self.pop.get("X")), 0, np.array(self.space.sizes) - 1).astype(int)
            self.pending = [tuple(int(v) for v in row) for row in X]
            self.handed = 0
            self.values = {}
        out = self.pending[self.handed:self.handed + n]
        self.handed += len(out)
        return out

    def tell(self, results: Sequence[Told]) -> None:
        if self.pop is None:
            return
        start = len(self.values)
        for k, r in enumerate(results):
            vals = penalised(None if r.values is None else r.values[: self.n_obj], self.worst)
            self.values[start + k] = vals
        if len(self.values) >= len(self.pending):
            from pymoo.core.evaluator import Evaluator
            from pymoo.problems.static import StaticProblem

            F = np.array([self.values[i] for i in range(len(self.pending))], dtype=float)
            Evaluator().eval(StaticProblem(self.problem, F=F), self.pop)
            self.algo.tell(infills=self.pop)
            self.pop = None


@register("ga")
class GeneticAgent(_Pymoo):
    """pymoo's single-objective GA (tournament selection, SBX, PM) on the first objective."""

    name = "ga"


@register("nsga2")
class NSGA2Agent(_Pymoo):
    """pymoo's NSGA-II (non-dominated sorting, crowding distance) on all objectives."""

    name = "nsga2"
    multi = True

    def _algorithm(self) -> Any:
        from pymoo.algorithms.moo.nsga2 import NSGA2

        return NSGA2(pop_size=self.pop_size, **self._operators())


@register("tpe")
class TPEAgent:
    """optuna's tree-structured Parzen estimator (multi-objective when the space has several)."""

    name = "tpe"
    startup = 10

    def __init__(self, space: Space, seed: int = 0, n_objectives: int = 1) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.n_obj = n_objectives
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup)
        self.study = optuna.create_study(directions=["minimize"] * n_objectives, sampler=sampler)
        self.open: list[tuple[Any, Index]] = []
        self.worst = [-np.inf] * n_objectives

    def ask(self, n: int) -> list[Index]:
        out = []
        for _ in range(n):
            trial = self.study.ask()
            idx = tuple(
                trial.suggest_int(p.name, 0, p.size - 1) if p.ordered
                else trial.suggest_categorical(p.name, list(range(p.size)))
                for p in self.space.parameters)
            self.open.append((trial, idx))
            out.append(idx)
        return out

    def tell(self, results: Sequence[Told]) -> None:
        for r in results:
            k = next(i for i, (_, idx) in enumerate(self.open) if idx == r.index)
            trial, _ = self.open.pop(k)
            vals = penalised(r.values, self.worst)
            self.study.tell(trial, vals if self.n_obj > 1 else vals[0])
