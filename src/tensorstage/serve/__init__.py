"""Request-level inference serving simulation.

Layout (after Vidur's split): :mod:`~tensorstage.serve.entities` (request table, step log),
:mod:`~tensorstage.serve.engines` (engine profiles, ``profiles.yaml``),
:mod:`~tensorstage.serve.predictor` (iteration cost from the graph and the compute/collective
models), :mod:`~tensorstage.serve.replica` (scheduling policies, paged KV),
:mod:`~tensorstage.serve.routers`, :mod:`~tensorstage.serve.loop` (event loop),
:mod:`~tensorstage.serve.workloads`, :mod:`~tensorstage.serve.metrics` and
:mod:`~tensorstage.serve.serving` (``simulate``).
"""

from tensorstage.serve.engines import EngineProfile, engine_names, load_profile
from tensorstage.serve.entities import RequestTable
from tensorstage.serve.serving import ServingPlan, ServingResult, simulate
from tensorstage.serve.workloads import Workload

__all__ = ["EngineProfile", "RequestTable", "ServingPlan", "ServingResult", "Workload", "engine_names",
           "load_profile", "simulate"]
