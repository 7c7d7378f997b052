"""One replay rank: run a job file's operations through ``torch.distributed`` (gloo), record times.

Started by :mod:`tensorstage.replay.launch` as ``python -m tensorstage.replay.worker JOB OUT``,
possibly inside a network namespace. The job is JSON: rank, world size, rendezvous address and
port, the network interface gloo must use, a time limit, the communicators (lists of global
ranks, created in the same order on every rank as ``torch.distributed.new_group`` requires) and
the :class:`~tensorstage.replay.ops.Op` list. The output is JSON: for every recorded op its index,
key and ``start_ns``/``end_ns`` on ``CLOCK_MONOTONIC`` (one clock for every process of a machine,
namespaces included, so ranks' times compare directly).

Collectives run as the simulator models them on send/recv (job ``collectives: "p2p"``,
:mod:`tensorstage.replay.algorithms`) or as gloo's own (``"native"``). The receives of a run of
consecutive send/recv ops are posted before its sends (:func:`_post_receives`).

Buffers are float32, allocated once at the largest size the job needs and sliced per op, so
allocation is not timed. Sends are asynchronous (``isend``), completed before the next op that
reuses the send buffer would matter: every pending send is waited for at the next barrier and at
the end; the recorded end of a send is when it was posted, its peer's receive carries the time.
Receives and collectives block, as a rank's program runs one op after another (a receive
posted ahead is waited for at its own place in the program).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def _run(job: dict) -> dict:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = job["ifname"]
    torch.set_num_threads(1)
    rank, world = int(job["rank"]), int(job["world"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://{job['master_addr']}:{job['master_port']}", rank=rank,
        world_size=world, timeout=timedelta(seconds=float(job["timeout_s"])),
    )
    groups = [dist.new_group(ranks=g) for g in job["groups"]]
    sizes = {len(g) for g in job["groups"]} | {world}
    max_elems = max([op["bytes"] // 4 for op in job["ops"]] + [1])
    max_n = max(sizes)
    a = torch.ones(max_elems + max_n)
    b = torch.zeros(max_elems + max_n)
    native = job.get("collectives", "p2p") == "native"
    scratch = None if native else torch.zeros(max_elems + max_n)
    pending: list = []
    posted: dict[int, Any] = {}  # op index -> its receive, posted ahead (see _post_receives)
    records = []

    def group_of(op: dict) -> tuple[object, int]:
        gi = op["group"]
        if gi < 0:
            return None, world
        return groups[gi], len(job["groups"][gi])

    def members_of(op: dict) -> list[int]:
        return list(range(world)) if op["group"] < 0 else list(job["groups"][op["group"]])

    for i, op in enumerate(job["ops"]):
        kind = op["kind"]
        grp, n = group_of(op)
        chunked = ("all_gather", "reduce_scatter", "all_to_all") if native else COLLECTIVES
        elems = max(n, (op["bytes"] // 4) // n * n) if kind in chunked \
            else max(1, op["bytes"] // 4)
        t0 = time.monotonic_ns()
        if kind == "barrier":
            for w in pending:
                w.wait()
            pending.clear()
            dist.barrier(group=grp)
        elif kind == "wait":
            time.sleep(max(0.0, float(op["wait_s"])))
        elif kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all") and not native:
            _p2p_collective(dist, kind, members_of(op), rank, elems, n, a, b, scratch, job.get("node_size"))
        elif kind == "all_reduce":
            dist.all_reduce(a[:elems], group=grp)
        elif kind == "all_gather":
            dist.all_gather_into_tensor(b[:elems], a[:elems // n], group=grp)
        elif kind == "reduce_scatter":
            dist.reduce_scatter_tensor(b[:elems // n], a[:elems], group=grp)
        elif kind == "all_to_all":
            dist.all_to_all_single(b[:elems], a[:elems], group=grp)
        elif kind in ("send", "recv"):
            if i == 0 or job["ops"][i - 1]["kind"] not in ("send", "recv"):
                _post_receives(dist, job["ops"], i, b, posted)
            if kind == "send":
                pending.append(dist.isend(a[:elems], dst=op["peer"], tag=op["tag"]))
            else:
                posted.pop(i).wait()
        else:
            raise ValueError(f"unknown op kind {kind!r}")
        t1 = time.monotonic_ns()
        if op.get("record", True) and kind != "barrier":
            records.append({"i": i, "key": op.get("key", ""), "kind": kind, "start_ns": t0, "end_ns": t1})
    for w in pending:
        w.wait()
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "records": records}


def _post_receives(dist: Any, ops: list[dict], first: int, b: Any, posted: dict[int, Any]) -> None:
    """Post every receive of the run of consecutive send/recv ops starting at ``first``.

    Why: gloo moves a message only after its receiver has announced the receive, and that
    announcement travels on the pair's one TCP connection; posted after this rank's own send to
    the same peer (a two-way exchange, written send-then-recv), it queues behind the bulk data
    and the second direction starts only when the first has finished (docs/benchmarks.md,
    "two-way exchange"). Posting the run's receives first lets both directions move at once.
    Each receive gets its own slice of ``b`` while they fit (contents are never read).
    """
    offset = 0
    j = first
    while j < len(ops) and ops[j]["kind"] in ("send", "recv"):
        op = ops[j]
        if op["kind"] == "recv":
            elems = max(1, op["bytes"] // 4)
            if offset + elems > b.numel():
                offset = 0
            posted[j] = dist.irecv(b[offset:offset + elems], src=op["peer"], tag=op["tag"])
            offset += elems
        j += 1


def _p2p_collective(dist: Any, kind: str, members: list[int], rank: int, elems: int, n: int,
                    a: Any, b: Any, scratch: Any, node_size: int | None) -> None:
    """``kind`` as the simulator models it, on send/recv (:mod:`tensorstage.replay.algorithms`)."""
    from tensorstage.replay import algorithms as alg

    if kind == "all_reduce":
        alg.all_reduce(dist, members, rank, a[:elems], b[:elems], scratch, node_size)
    elif kind == "all_gather":
        alg.all_gather(dist, members, rank, a[:elems // n], b[:elems], node_size)
    elif kind == "reduce_scatter":
        alg.reduce_scatter(dist, members, rank, a[:elems], b[:elems // n], scratch, node_size)
    else:
        alg.all_to_all(dist, members, rank, a[:elems], b[:elems])


def main(argv: list[str]) -> int:
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    import warnings

    warnings.filterwarnings("ignore")  # deprecation notes of torch.distributed are not results
    result = _run(job)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
