"""Search agents behind one ask/tell interface (:mod:`.base`); importing this package registers
the built-ins: grid, random, random_walk, aco (:mod:`.simple`), ga, nsga2, tpe (:mod:`.model_based`)."""

from tensorstage.explore.agents import model_based, simple  # noqa: F401  (registration)
from tensorstage.explore.agents.base import Agent, Told, agent_names, make_agent, register

__all__ = ["Agent", "Told", "agent_names", "make_agent", "register"]
