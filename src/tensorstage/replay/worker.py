"""One replay rank: run a job file's operations through ``torch.distributed`` (gloo), record times.

Started by :mod:`tensorstage.replay.launch` as ``python -m tensorstage.replay.worker JOB OUT``,
possibly inside a network namespace. The job is JSON: rank, world size, rendezvous address and
port, the network interface gloo must use, a time limit, the communicators (lists of global
ranks, created in the same order on every rank as ``torch.distributed.new_group`` requires) and
the :class:`~tensorstage.replay.ops.Op` list. The output is JSON: for every recorded op its index,
key and ``start_ns``/``end_ns`` on ``CLOCK_MONOTONIC`` (one clock for every process of a machine,
namespaces included, so ranks' times compare directly).

Buffers are float32, allocated once at the largest size the job needs and sliced per op, so
allocation is not timed. Sends are asynchronous (``isend``), completed before the next op that
reuses the send buffer would matter: every pending send is waited for at the next barrier and at
the end; the recorded end of a send is when it was posted, its peer's receive carries the time.
Receives and collectives block, as a rank's program runs one op after another.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


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
    pending: list = []
    records = []

    def group_of(op: dict) -> tuple[object, int]:
        gi = op["group"]
        if gi < 0:
            return None, world
        return groups[gi], len(job["groups"][gi])

    for i, op in enumerate(job["ops"]):
        kind = op["kind"]
        grp, n = group_of(op)
        elems = max(n, (op["bytes"] // 4) // n * n) if kind in ("all_gather", "reduce_scatter", "all_to_all") \
            else max(1, op["bytes"] // 4)
        t0 = time.monotonic_ns()
        if kind == "barrier":
            for w in pending:
                w.wait()
            pending.clear()
            dist.barrier(group=grp)
        elif kind == "wait":
            time.sleep(max(0.0, float(op["wait_s"])))
        elif kind == "all_reduce":
            dist.all_reduce(a[:elems], group=grp)
        elif kind == "all_gather":
            dist.all_gather_into_tensor(b[:elems], a[:elems // n], group=grp)
        elif kind == "reduce_scatter":
            dist.reduce_scatter_tensor(b[:elems // n], a[:elems], group=grp)
        elif kind == "all_to_all":
            dist.all_to_all_single(b[:elems], a[:elems], group=grp)
        elif kind == "send":
            pending.append(dist.isend(a[:elems], dst=op["peer"], tag=op["tag"]))
        elif kind == "recv":
            dist.recv(b[:elems], src=op["peer"], tag=op["tag"])
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
