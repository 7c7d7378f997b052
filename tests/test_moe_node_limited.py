"""Group-limited ("node-limited") MoE routing: DeepSeek-V3's tokens reach at most 4 nodes.

Checked against closed forms (the all-to-all's per-tier traffic written out), the HF config and
preset fields, the lowering (route on the token all-to-alls only) and the Chakra round trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.model.hf import load_hf_config
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind
from tensorstage.sim.collectives import Fabric, Tier, all_to_all_s
from tensorstage.trace import write_chakra
from tensorstage.trace.to_programs import programs_from_trace

HF = Path(__file__).parent / "data" / "hf"
NV_BPS, IB_BPS, NV_LAT, IB_LAT = 200e9, 50e9, 3e-6, 5e-6


def _fabric() -> Fabric:
    return Fabric(tiers=(Tier("nvlink", 8, NV_BPS, NV_LAT), Tier("ib", 1024, IB_BPS, IB_LAT)))


def test_all_to_all_tiers_in_closed_form():
    """EP 64 over 8 nodes of 8, a 100 MB per-rank buffer of tokens with top-8 experts. Flat: 56/64
    of it crosses InfiniBand, 7/64 stays on NVLink. Node-limited (8 groups, 4 per token, one group
    per node): each token crosses InfiniBand once per remote node it reaches (4 of its 8 copies, so
    half the flat share) and every copy for another GPU of the node is forwarded over NVLink (7/8 of
    the buffer); the tiers overlap, the slower sets the time."""
    b = 100e6
    flat, alg = all_to_all_s(b, [8, 64], _fabric())
    assert alg == "direct"
    assert flat == pytest.approx(max(56 / 64 * b / IB_BPS, 7 / 64 * b / NV_BPS) + NV_LAT + IB_LAT, rel=1e-12)
    routed, alg = all_to_all_s(b, [8, 64], _fabric(), (8, 8, 4))
    assert alg == "node-limited"
    assert routed == pytest.approx(max(56 / 64 * b * 4 / 8 / IB_BPS, 7 / 8 * b / NV_BPS) + NV_LAT + IB_LAT, rel=1e-12)
    # inside one node there is nothing to limit; one rank per node: groups of 8 nodes, 4 groups =
    # 32 nodes per token, more than its 8 copies: no saving
    assert all_to_all_s(b, [8, 8], _fabric(), (8, 8, 4)) == all_to_all_s(b, [8, 8], _fabric())
    assert all_to_all_s(b, [1, 64], _fabric(), (8, 8, 4))[0] == pytest.approx(all_to_all_s(b, [1, 64], _fabric())[0])


def test_config_and_preset_carry_the_limit():
    spec = load_hf_config(HF / "deepseek-v3.json")  # n_group 8, topk_group 4
    assert (spec.moe.route_groups, spec.moe.route_topk_groups) == (8, 4)
    preset = resolve_model("deepseek-v3")
    assert (preset.moe.route_groups, preset.moe.route_topk_groups) == (8, 4)
    assert resolve_model("qwen3-30b-a3b").moe.route_groups == 0  # plain top-k routing


def _routed_spec():
    spec = resolve_model("qwen3-30b-a3b")
    return spec.model_copy(update={"moe": spec.moe.model_copy(update={"route_groups": 8,
                                                                        "route_topk_groups": 4})})


def test_lowering_marks_token_all_to_alls_and_the_trace_keeps_it(tmp_path: Path):
    spec = _routed_spec()
    plan = ParallelPlan.parse({"tp": 1, "pp": 1, "dp": 16, "ep": 16, "seq": 512, "global_batch": 16,
                               "recompute": "none", "sp": False})
    low = lower(spec, plan, fuse=True)
    a2a = [n for p in low.programs for n in p.nodes if n.kind == NodeKind.COLL and n.comm == CollKind.ALL_TO_ALL]
    tokens = [n for n in a2a if ".counts" not in n.name]
    assert tokens and all(n.route == (8, 8, 4) for n in tokens)
    assert all(n.route is None for n in a2a if ".counts" in n.name)
    for side_files in (True, False):
        d = tmp_path / f"tr{side_files}"
        write_chakra(low.programs, low.mesh, d, json=side_files, classes_only=True, progress=False)
        back = programs_from_trace(d)
        got = [n.route for p in back.programs for n in p.nodes if n.kind == NodeKind.COLL and n.comm == CollKind.ALL_TO_ALL]
        assert got == [n.route for n in a2a]


def test_deepseek_v3_step_gains_from_the_limit():
    """DeepSeek-V3 on H800 (PP 16, EP 64 over 8 nodes): the limit halves the InfiniBand share of
    every EP all-to-all, so the step is shorter than with flat routing, by less than the exposed
    all-to-all time of flat routing."""
    from tensorstage import api

    spec = resolve_model("deepseek-v3")
    flat = spec.model_copy(update={"moe": spec.moe.model_copy(update={"route_groups": 0, "route_topk_groups": 0})})
    plan = ParallelPlan.parse(dict(tp=1, pp=16, dp=128, ep=64, seq=4096, global_batch=2048, micro_batch=1,
                                   recompute="selective", zero=1, dtype="fp8", moe_dispatch_fp8=True, sp=False,
                                   pp_layer_split=(3,) + (4,) * 14 + (2,)))
    a = api.simulate(flat, "hgx-h800", plan).result
    b = api.simulate(spec, "hgx-h800", plan).result
    exposed = max(c.exposed_comm_s.get("all_to_all/ep", 0.0) for c in a.classes)
    assert 0 < a.step_time_s - b.step_time_s < exposed
