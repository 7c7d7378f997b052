"""Parallel plans, the rank mesh and placements: which rank holds which slice of every tensor, and
which collectives a placement change needs. Knows nothing of files or time.

* :mod:`~tensorstage.parallel.mesh` - ``Mesh`` (named axes, O(1) rank/group arithmetic, views) and
  ``Communicators`` (group ids for ``pg_name``);
* :mod:`~tensorstage.parallel.plan` - ``ParallelPlan`` (degrees, schedule, batch, rules), ``load_plan``;
* :mod:`~tensorstage.parallel.placement` - ``Shard``/``Replicate``/``Partial``, ``TensorLayout``,
  ``redistribute`` (placement change -> ``Collective`` list), ``contract`` (einsum sharding rule);
* :mod:`~tensorstage.parallel.apply` - parallelisms as functions that set placements (TP column/row,
  SP, vocab parallel, ZeRO/FSDP/HSDP, EP, CP).
"""

from tensorstage.parallel.mesh import Axis, Communicators, Mesh
from tensorstage.parallel.placement import (
    Collective,
    Partial,
    Placement,
    Replicate,
    Shard,
    TensorLayout,
    contract,
    redistribute,
    ring_wire_bytes,
)
from tensorstage.parallel.plan import ParallelPlan, load_plan, read_plan_yaml

__all__ = [
    "Axis",
    "Collective",
    "Communicators",
    "Mesh",
    "ParallelPlan",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "TensorLayout",
    "contract",
    "load_plan",
    "read_plan_yaml",
    "redistribute",
    "ring_wire_bytes",
]
