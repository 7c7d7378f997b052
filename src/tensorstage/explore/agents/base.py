"""The ask/tell contract every search agent follows, and the agent registry.

An agent proposes index vectors (one index per parameter of the :class:`Space`; see
:mod:`tensorstage.explore.space`) with ``ask(n)`` and learns from ``tell(results)``. It always
*minimises* a vector of objective values (maximised objectives arrive negated); a configuration
that is infeasible or failed arrives as ``None`` and the agent decides what that means (most use
:func:`penalised`). The study, not the agent, keeps the trials: a resumed study replays them
through a fresh agent of the same seed.

Plug-ins: ``--agent package.module:ClassName`` imports a class with the constructor
``(space, seed, n_objectives)`` and the two methods; built-ins register with :func:`register`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tensorstage.errors import SpecError
from tensorstage.explore.space import Space

Index = tuple[int, ...]


@dataclass(frozen=True)
class Told:
    """One result handed back to an agent: what it asked and the (minimised) objective values."""

    index: Index
    values: tuple[float, ...] | None  # None: infeasible, pruned or failed


class Agent(Protocol):
    name: str

    def ask(self, n: int) -> list[Index]:
        """Up to ``n`` new index vectors; an empty list means the agent has nothing left to try."""
        ...

    def tell(self, results: Sequence[Told]) -> None:
        """Results of earlier asks, in the order asked."""
        ...


#: Penalty of an infeasible result before any feasible one has been seen (finite, so every
#: optimiser package accepts it, and far above any step time or memory in bytes).
UNSEEN_PENALTY = 1e30

AgentFactory = Callable[[Space, int, int], Agent]
_AGENTS: dict[str, AgentFactory] = {}


def register(name: str) -> Callable[[AgentFactory], AgentFactory]:
    """Register an agent class under ``name`` (a duplicate name is a programming error)."""
    def deco(cls: AgentFactory) -> AgentFactory:
        if name in _AGENTS:
            raise ValueError(f"agent {name!r} registered twice")
        _AGENTS[name] = cls
        return cls
    return deco


def agent_names() -> list[str]:
    return sorted(_AGENTS)


def make_agent(name: str, space: Space, seed: int = 0) -> Agent:
    """A registered agent by name, or a plug-in ``module:Class``; unknown names are a ``SpecError``."""
    n_obj = len(space.objectives)
    if ":" in name:
        mod, _, cls = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as exc:
            raise SpecError("agent", f"cannot load plug-in {name!r}: {exc}") from None
        if not callable(factory):
            raise SpecError("agent", f"plug-in {name!r} is a {type(factory).__name__}, not a class taking "
                            "(space, seed, n_objectives)")
        bad = f"plug-in {name!r} cannot be built as {cls}(space, seed, n_objectives)"
        try:  # a callable with another signature; an error inside a right one's __init__ is its own
            inspect.signature(factory).bind(space, seed, n_obj)
        except TypeError as exc:
            raise SpecError("agent", f"{bad}: {exc}") from None
        except ValueError:  # no signature to inspect (a builtin, never a user's class): the call decides
            try:
                agent = factory(space, seed, n_obj)
            except TypeError as exc:
                raise SpecError("agent", f"{bad}: {exc}") from None
        else:
            agent = factory(space, seed, n_obj)
        missing = [m for m in ("ask", "tell") if not callable(getattr(agent, m, None))]
        if missing:
            raise SpecError("agent", f"plug-in {name!r} has no {' or '.join(missing)} method (an agent answers "
                            "ask(n) -> list of index tuples and tell(results))")
        return agent
    if name not in _AGENTS:
        raise SpecError("agent", f"unknown agent {name!r}", [*agent_names(), "module:Class"])
    return _AGENTS[name](space, seed, n_obj)


def penalised(values: tuple[float, ...] | None, worst: list[float]) -> list[float]:
    """Objective values with an infeasible result replaced by a penalty above everything seen so
    far (``worst`` is updated in place with the largest finite value per objective)."""
    if values is not None:
        for i, v in enumerate(values):
            worst[i] = max(worst[i], v)
        return list(values)
    return [w + abs(w) + 1.0 if math.isfinite(w) else UNSEEN_PENALTY for w in worst]
