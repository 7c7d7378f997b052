"""Routers: which replica a new request goes to.

* ``round_robin``: replicas in turn (request ``i`` to replica ``i mod R`` among arrivals).
* ``least_tokens``: the replica with the fewest outstanding prompt + output tokens (ties: lowest
  index), the load signal of llm-d / Dynamo-style routers.
* ``prefix``: a request with a prefix goes to ``prefix_id mod R`` (prefix affinity, so its cache
  hits); requests without one fall back to ``least_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tensorstage.errors import SpecError
from tensorstage.serve.entities import RequestTable
from tensorstage.serve.replica import Replica

ROUTERS = ("round_robin", "least_tokens", "prefix")

Router = Callable[[int, RequestTable, Sequence[Replica]], int]


def make_router(name: str) -> Router:
    """The routing function ``(request, table, replicas) -> replica index`` called ``name``."""
    if name not in ROUTERS:
        raise SpecError("router", f"unknown router {name!r}", ROUTERS)
    count = [0]

    def round_robin(r: int, req: RequestTable, reps: Sequence[Replica]) -> int:
        i = count[0] % len(reps)
        count[0] += 1
        return i

    def least_tokens(r: int, req: RequestTable, reps: Sequence[Replica]) -> int:
        best, low = 0, reps[0].outstanding_tokens
        for i in range(1, len(reps)):  # strictly fewer: ties keep the lowest index
            if reps[i].outstanding_tokens < low:
                best, low = i, reps[i].outstanding_tokens
        return best

    def prefix(r: int, req: RequestTable, reps: Sequence[Replica]) -> int:
        pid = int(req.prefix_id[r])
        return pid % len(reps) if pid >= 0 else least_tokens(r, req, reps)

    return {"round_robin": round_robin, "least_tokens": least_tokens, "prefix": prefix}[name]


__all__ = ["ROUTERS", "Router", "make_router"]
