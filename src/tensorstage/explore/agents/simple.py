"""Model-free agents: exhaustive grid, uniform random sampling, random walk, ant colony (ACO).

All are seeded (``numpy.random.default_rng(seed)``) and never propose an index they proposed
before, so a replay with the same seed asks the same sequence (the study's resume relies on it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from tensorstage.explore.agents.base import Index, Told, penalised, register
from tensorstage.explore.space import Space

#: Fresh proposals tried per requested one before an agent reports the space exhausted.
_TRIES = 200


class _Seen:
    """Shared bookkeeping: proposals made so far, and a uniform sampler that avoids them."""

    def __init__(self, space: Space, seed: int) -> None:
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.seen: set[Index] = set()

    def fresh(self, idx: Index) -> bool:
        if idx in self.seen:
            return False
        self.seen.add(idx)
        return True

    def uniform(self) -> Index:
        return tuple(int(self.rng.integers(0, s)) for s in self.space.sizes)

    def exhausted(self) -> bool:
        return len(self.seen) >= self.space.grid_size


@register("grid")
class GridAgent:
    """Every feasible configuration in row-major order (vectorised constraint check when the grid
    fits in memory); the reference optimum of small spaces."""

    name = "grid"

    def __init__(self, space: Space, seed: int = 0, n_objectives: int = 1) -> None:
        self._it = self._order(space)

    @staticmethod
    def _order(space: Space) -> Iterator[Index]:
        from tensorstage.explore.space import MAX_ENUMERATE

        if space.grid_size <= MAX_ENUMERATE:
            idx = space.enumerate_indices()
            mask, _ = space.feasible_mask(idx)
            for row in idx[mask]:
                yield tuple(int(v) for v in row)
        else:
            for row in space.iter_grid():
                if space.feasible(space.decode(row))[0]:
                    yield row

    def ask(self, n: int) -> list[Index]:
        out = []
        for idx in self._it:
            out.append(idx)
            if len(out) == n:
                break
        return out

    def tell(self, results: Sequence[Told]) -> None:
        pass


@register("random")
class RandomAgent(_Seen):
    """Uniform sampling without repeats: the baseline every other agent should beat."""

    name = "random"

    def __init__(self, space: Space, seed: int = 0, n_objectives: int = 1) -> None:
        super().__init__(space, seed)

    def ask(self, n: int) -> list[Index]:
        out: list[Index] = []
        for _ in range(n * _TRIES):
            if len(out) == n or self.exhausted():
                break
            idx = self.uniform()
            if self.fresh(idx):
                out.append(idx)
        return out

    def tell(self, results: Sequence[Told]) -> None:
        pass


@register("random_walk")
class RandomWalkAgent(_Seen):
    """COSMIC's random walker: step from the best point so far by moving one or two parameters to a
    neighbouring value (ordered kinds) or any other value (choices); restart uniformly with
    probability ``restart`` or when the neighbourhood is used up."""

    name = "random_walk"
    restart = 0.1

    def __init__(self, space: Space, seed: int = 0, n_objectives: int = 1) -> None:
        super().__init__(space, seed)
        self.best: tuple[float, Index] | None = None
        self.worst = [-np.inf] * n_objectives

    def _neighbour(self, idx: Index) -> Index:
        out = list(idx)
        k = 1 + int(self.rng.random() < 0.3)
        for j in self.rng.choice(len(out), size=min(k, len(out)), replace=False):
            p = self.space.parameters[int(j)]
            if p.size == 1:
                continue
            if p.ordered:
                out[j] = int(np.clip(out[j] + self.rng.choice((-1, 1)), 0, p.size - 1))
            else:
                out[j] = int(self.rng.integers(0, p.size))
        return tuple(out)

    def ask(self, n: int) -> list[Index]:
        out: list[Index] = []
        for _ in range(n * _TRIES):
            if len(out) == n or self.exhausted():
                break
            start = self.best[1] if self.best is not None and self.rng.random() > self.restart else None
            idx = self.uniform() if start is None else self._neighbour(start)
            if self.fresh(idx):
                out.append(idx)
        return out

    def tell(self, results: Sequence[Told]) -> None:
        for r in results:
            if r.values is not None and (self.best is None or r.values[0] < self.best[0]):
                self.best = (r.values[0], r.index)


@register("aco")
class AntColonyAgent(_Seen):
    """Ant colony optimisation over the discrete domains (after COSMIC's ACO agent): each ant
    draws every parameter from a pheromone distribution; after each batch the pheromone evaporates
    by ``rho`` and the best ``elite`` ants of the batch deposit ``1 / rank``."""

    name = "aco"
    rho = 0.2
    elite = 3

    def __init__(self, space: Space, seed: int = 0, n_objectives: int = 1) -> None:
        super().__init__(space, seed)
        self.tau = [np.ones(s) for s in space.sizes]
        self.worst = [-np.inf] * n_objectives

    def ask(self, n: int) -> list[Index]:
        out: list[Index] = []
        for _ in range(n * _TRIES):
            if len(out) == n or self.exhausted():
                break
            idx = tuple(int(self.rng.choice(len(t), p=t / t.sum())) for t in self.tau)
            if self.fresh(idx):
                out.append(idx)
        return out

    def tell(self, results: Sequence[Told]) -> None:
        scored = sorted((penalised(r.values, self.worst)[0], i) for i, r in enumerate(results))
        for t in self.tau:
            t *= 1.0 - self.rho
        for rank, (_, i) in enumerate(scored[: self.elite]):
            if results[i].values is None:
                continue
            for j, v in enumerate(results[i].index):
                self.tau[j][v] += 1.0 / (rank + 1)
        for t in self.tau:
            np.maximum(t, 1e-3, out=t)  # keep every value reachable
