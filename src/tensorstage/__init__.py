"""tensorstage: model distributed LLM training and inference before you own the cluster.

The flow is one-directional (see docs/architecture.md): ModelSpec -> symbolic Graph ->
sharded graph -> per-rank-class Program -> Chakra ET traces / simulation / reports.

The stable Python API is :mod:`tensorstage.api`; its public names are re-exported here lazily
(``tensorstage.simulate`` is ``tensorstage.api.simulate``), so ``import tensorstage`` stays cheap
and no subpackage imports the API back (docs/api.md). ``api.lower`` and ``api.serve`` are not
re-exported: the names ``tensorstage.lower`` and ``tensorstage.serve`` are packages.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API_NAMES = frozenset({
    "DEFAULT_MODEL", "DEFAULT_PLAN", "DEFAULT_PLAN_VALUES", "DEFAULT_SYSTEM", "Generated", "Plan", "PlanChoice",
    "RunOutput", "Served", "SimRun", "Validation", "choose_plan", "describe_plan", "generate", "load_model", "load_system",
    "make_plan", "run", "simulate", "simulate_trace", "validate",
})


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from tensorstage import api

        return getattr(api, name)
    raise AttributeError(f"module 'tensorstage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API_NAMES})
