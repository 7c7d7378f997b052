"""Link contention between concurrent communications on a rank's scale-out port (sim/engine.py).

Expected times are written out from the alpha-beta closed forms (no latency, one 10 GB/s NIC).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import CollKind, NodeKind, Program
from tensorstage.sim.collectives import Fabric, Tier
from tensorstage.sim.compute import ComputeModel
from tensorstage.sim.engine import execute
from tensorstage.sim.machine import Machine


def test_link_contention_queues_collective_behind_send_on_the_nic() -> None:
    """A cross-node send and a DP all-reduce posted together on one rank's NIC (B = 10 GB/s, no
    latency): without contention both run at full rate; with it the all-reduce (ring of 2: S/B)
    waits for the send's bytes S_p/B."""
    b_ib, s_ar, s_p = 10e9, 4e9, 1e9
    fab = Fabric((Tier("nvl", 1, 100e9, 0.0), Tier("ib", 1024, b_ib, 0.0)))
    comp = ComputeModel(tensor_flops=1e15, attention_flops=1e15, vector_flops=1e14, hbm_Bps=1e12, launch_s=0.0,
                        peak_flops=1e15)
    mesh = Mesh.create([("dp", 2), ("pp", 2)])
    p0, p1 = Program({"pp": 0}), Program({"pp": 1})
    ar = p0.add("dp_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=int(s_ar), axes=("dp",))
    send = p0.add("send", NodeKind.SEND, comm_bytes=int(s_p), peer_axis="pp", peer_offset=1, tag=7)
    p1.add("recv", NodeKind.RECV, comm_bytes=int(s_p), peer_axis="pp", peer_offset=-1, tag=7)
    base = Machine(comp, fab, 80 * 2**30, 0.0, "bf16", "t")
    free = execute([p0, p1], mesh, base)
    busy = execute([p0, p1], mesh, replace(base, link_contention=True))
    assert free.end[send.id] == pytest.approx(s_p / b_ib) and free.end[ar.id] == pytest.approx(s_ar / b_ib)
    assert busy.end[send.id] == pytest.approx(s_p / b_ib)
    assert busy.end[ar.id] == pytest.approx((s_p + s_ar) / b_ib, rel=1e-5)


def test_in_node_collective_does_not_wait_for_the_nic() -> None:
    """A TP all-reduce inside a node (ring of 2 at 100 GB/s: S/B) moves no scale-out bytes, so a
    cross-node send on the NIC does not delay it (ASTRA-sim's one-at-a-time rule would)."""
    s_tp, s_p = 2e9, 1e9
    fab = Fabric((Tier("nvl", 2, 100e9, 0.0), Tier("ib", 1024, 10e9, 0.0)))
    comp = ComputeModel(tensor_flops=1e15, attention_flops=1e15, vector_flops=1e14, hbm_Bps=1e12, launch_s=0.0,
                        peak_flops=1e15)
    mesh = Mesh.create([("tp", 2), ("pp", 2)])
    p0, p1 = Program({"pp": 0}), Program({"pp": 1})
    send = p0.add("send", NodeKind.SEND, comm_bytes=int(s_p), peer_axis="pp", peer_offset=1, tag=7)
    ar = p0.add("tp_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=int(s_tp), axes=("tp",))
    p1.add("recv", NodeKind.RECV, comm_bytes=int(s_p), peer_axis="pp", peer_offset=-1, tag=7)
    busy = execute([p0, p1], mesh, Machine(comp, fab, 80 * 2**30, 0.0, "bf16", "t", link_contention=True))
    assert busy.end[send.id] == pytest.approx(s_p / 10e9)
    assert busy.end[ar.id] == pytest.approx(s_tp / 100e9)
