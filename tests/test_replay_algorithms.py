"""The replay's point-to-point collectives compute what torch.distributed's own collectives compute.

Independent reference: gloo's native ``all_reduce`` / ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` / ``all_to_all_single`` on the same random inputs, in a real gloo world
of 4 processes on loopback, for the world and for a subgroup of non-consecutive ranks ({0, 2, 3}),
one ring each, and for the world on two emulated nodes of 2 (two channel rings), so ring order,
neighbour, channel and chunk indexing over global ranks are all exercised.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

WORLD = 4
GROUPS = ([0, 1, 2, 3], [0, 2, 3], [0, 1, 2, 3])
NODE_SIZE = (None, 2, 2)  # the subgroup has 1 + 2 members per node: one ring; the last: 2 channels
CHUNK = 5  # elements per member: sizes are not powers of two


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from tensorstage.replay import algorithms as alg

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    sub = dist.new_group(ranks=GROUPS[1])
    report: dict[str, float] = {}
    for gi, members in enumerate(GROUPS):
        if rank not in members:
            continue
        grp = sub if gi == 1 else None
        node = NODE_SIZE[gi]
        n = len(members)
        gen = torch.Generator().manual_seed(100 * gi + rank)
        x = torch.randn(n * CHUNK, generator=gen)
        scratch = torch.zeros(n * CHUNK)
        # all-reduce
        ref = x.clone()
        dist.all_reduce(ref, group=grp)
        got = torch.zeros_like(x)
        alg.all_reduce(dist, members, rank, x.clone(), got, scratch, node)
        report[f"all_reduce/{gi}"] = float((got - ref).abs().max())
        # reduce-scatter
        ref = torch.zeros(CHUNK)
        dist.reduce_scatter_tensor(ref, x.clone(), group=grp)
        got = torch.zeros(CHUNK)
        inp = x.clone()
        alg.reduce_scatter(dist, members, rank, inp, got, scratch, node)
        report[f"reduce_scatter/{gi}"] = float((got - ref).abs().max())
        report[f"reduce_scatter_input_kept/{gi}"] = float((inp - x).abs().max())
        # all-gather
        shard = x[:CHUNK].clone()
        ref = torch.zeros(n * CHUNK)
        dist.all_gather_into_tensor(ref, shard, group=grp)
        got = torch.zeros(n * CHUNK)
        alg.all_gather(dist, members, rank, shard, got, node)
        report[f"all_gather/{gi}"] = float((got - ref).abs().max())
        # all-to-all
        ref = torch.zeros(n * CHUNK)
        dist.all_to_all_single(ref, x.clone(), group=grp)
        got = torch.zeros(n * CHUNK)
        alg.all_to_all(dist, members, rank, x.clone(), got)
        report[f"all_to_all/{gi}"] = float((got - ref).abs().max())
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(report))


def test_p2p_collectives_equal_gloo_native_collectives() -> None:
    import torch.multiprocessing as mp

    from tensorstage.replay.launch import _free_port

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="fork")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1.0):  # True once every rank has exited (raises if one failed)
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("gloo world did not finish within 120 s")
        reports = {r: json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)}
    for r, rep in reports.items():
        expected_keys = {f"{op}/{gi}" for gi, g in enumerate(GROUPS) if r in g
                         for op in ("all_reduce", "reduce_scatter", "reduce_scatter_input_kept", "all_gather",
                                    "all_to_all")}
        assert set(rep) == expected_keys, f"rank {r}"
        for key, err in rep.items():
            assert err <= 1e-5, f"rank {r} {key}: max |p2p - native| = {err}"


def test_channel_rings_leave_every_node_once_per_member() -> None:
    from tensorstage.replay.algorithms import channel_rings

    assert channel_rings([0, 1, 2, 3], None) == [[0, 1, 2, 3]]
    assert channel_rings([0, 2, 3], 2) == [[0, 2, 3]]  # unequal members per node: one ring
    assert channel_rings([0, 2, 4, 6], 2) == [[0, 2, 4, 6]]  # one member per node: one ring
    rings = channel_rings(list(range(8)), 4)
    assert len(rings) == 4 and all(sorted(r) == list(range(8)) for r in rings)
    exits = [r[i] for r in rings for i in range(8) if r[i] // 4 != r[(i + 1) % 8] // 4]
    assert sorted(exits) == list(range(8))  # each member crosses to the other node in one channel
