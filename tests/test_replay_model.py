"""Replay predictions, fit and calibration, without starting processes.

Independent expectations: the textbook ring/direct alpha-beta formulas written out here (Thakur,
Rabenseifner & Gropp 2005), gloo's native reduce-scatter being an all-reduce of the whole input
(PyTorch ``ProcessGroupGloo::reduce_scatter_tensor_coalesced``), and a fit that must recover the
alpha and bandwidth used to synthesize its data from those closed forms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import run_main
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.errors import SpecError
from tensorstage.hardware.system import load_system
from tensorstage.replay.bench import bench_from_dict, make_links
from tensorstage.replay.calibrate import calibrated_system
from tensorstage.replay.fit import compare, fit_tiers
from tensorstage.replay.microbench import BenchCase, Sample, bench_cases, bench_ops, samples_from_results
from tensorstage.replay.model import Links, LinkTier, algorithm_time_s, simulator_time_s
from tensorstage.sim.machine import fabric_from_system

B, A, N = 50e6, 200e-6, 8
LINKS = Links(N, N, (LinkTier("link", B, A),))
WORLD = tuple(range(N))


def closed_form(op: str, n: int, s: float, b: float = B, a: float = A, impl: str = "native") -> float:
    """The replay's algorithms as alpha-beta closed forms (S = full buffer): ``native`` = gloo's,
    ``p2p`` = ring reduce-scatter / all-gather / all-reduce and direct all-to-all."""
    rs_native = op == "reduce_scatter" and impl == "native"
    return {
        "all_reduce": 2 * (n - 1) / n * s / b + 2 * (n - 1) * a,
        "reduce_scatter": (2 if rs_native else 1) * ((n - 1) / n * s / b + (n - 1) * a),  # native: all-reduce
        "all_gather": (n - 1) / n * s / b + (n - 1) * a,
        "all_to_all": (n - 1) / n * s / b + a,
        "send_recv": s / b + a,
    }[op]


@pytest.mark.parametrize("impl", ["p2p", "native"])
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_algorithm_model_is_the_textbook_formula(op: str, impl: str) -> None:
    s = 4 * 2**20
    case = BenchCase(op, "world", WORLD, s)
    assert algorithm_time_s(case, LINKS, impl) == pytest.approx(closed_form(op, N, s, impl=impl))


def test_simulator_equals_the_p2p_algorithms_and_native_differs_in_reduce_scatter() -> None:
    s = 4 * 2**20
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        c = BenchCase(op, "world", WORLD, s)
        assert simulator_time_s(c, LINKS) == pytest.approx(closed_form(op, N, s, impl="p2p"))
    rs = BenchCase("reduce_scatter", "world", WORLD, s)
    # the simulator charges a ring reduce-scatter: half of gloo's all-reduce-based one
    assert simulator_time_s(rs, LINKS) == pytest.approx((N - 1) / N * s / B + (N - 1) * A)
    assert algorithm_time_s(rs, LINKS, "native") == pytest.approx(2 * simulator_time_s(rs, LINKS))
    p2p = BenchCase("send_recv", "p2p-intra", (0, 1), s)
    assert simulator_time_s(p2p, LINKS) == pytest.approx(s / B + A)


def test_two_tier_rings_native_single_p2p_multi_channel_and_the_simulator() -> None:
    links = Links(8, 4, (LinkTier("intra", 100e6, 0.0), LinkTier("inter", 25e6, 0.0)))
    s = 8 * 2**20
    v = 7 / 8 * s  # ring all-gather volume each member sends
    world = BenchCase("all_gather", "world", WORLD, s)
    # gloo: one ring, the full volume over the slow hop
    assert algorithm_time_s(world, links, "native") == pytest.approx(v / 25e6)
    # p2p: 4 channels; a member's intra port carries 3 of them, its inter port 1
    assert algorithm_time_s(world, links, "p2p") == pytest.approx(max(3 / 4 * v / 100e6, v / 4 / 25e6))
    # the simulator: the full volume on every intra port, the inter volume spread over 4 ports
    assert simulator_time_s(world, links) == pytest.approx(max(v / 100e6, v / (4 * 25e6)))
    node = BenchCase("all_gather", "node", (0, 1, 2, 3), s)
    assert algorithm_time_s(node, links) == pytest.approx(3 / 4 * s / 100e6)
    a2a = BenchCase("all_to_all", "world", WORLD, s)
    assert algorithm_time_s(a2a, links) == pytest.approx(max(3 / 8 * s / 100e6, 4 / 8 * s / 25e6))
    uneven = BenchCase("all_gather", "world", (0, 1, 2, 4), s)  # 3 + 1 members: one ring
    assert algorithm_time_s(uneven, links, "p2p") == pytest.approx(3 / 4 * s / 25e6)


def test_fit_recovers_alpha_and_bandwidth_of_synthetic_closed_form_data() -> None:
    cases = bench_cases(N, N, ("all_reduce", "all_gather", "send_recv"), (2**16, 2**18, 2**20, 2**22))
    samples = [Sample(c, 0, closed_form(c.op, len(c.ranks), c.size_bytes, 40e6, 300e-6)) for c in cases]
    (fit,) = fit_tiers(compare(samples, LINKS), LINKS)
    assert fit.bandwidth_Bps == pytest.approx(40e6, rel=1e-6)
    assert fit.latency_s == pytest.approx(300e-6, rel=1e-6)
    assert fit.bandwidth_vs_emulated_pct == pytest.approx(-20.0)


def test_bench_ops_pair_every_send_with_a_receive_and_reduce_by_last_arrival() -> None:
    cases = bench_cases(4, 4, ("all_reduce", "send_recv"), (2**16,))
    groups, ops = bench_ops(cases, 4, warmup=1, repeats=2)
    assert groups == []
    sends = [o for o in ops[0] if o.kind == "send"]
    recvs = [o for o in ops[1] if o.kind == "recv"]
    assert len(sends) == len(recvs) == 3 and [o.tag for o in sends] == [o.tag for o in recvs]
    assert all(o.kind == "barrier" for o in ops[2] if o.kind != "all_reduce")
    # time = max(end) - max(start): last arrival at 5 ns, last finish at 12 ns
    res = [{"records": [{"key": "0:0", "start_ns": 1, "end_ns": 12}]},
           {"records": [{"key": "0:0", "start_ns": 5, "end_ns": 9}]}]
    (s,) = samples_from_results(cases, res)
    assert s.time_s == pytest.approx(7e-9)


def test_calibrated_system_loads_and_charges_the_fitted_rate(tmp_path: Path) -> None:
    cases = bench_cases(N, N, ("all_reduce", "send_recv"), (2**18, 2**20, 2**22))
    samples = [Sample(c, 0, closed_form(c.op, len(c.ranks), c.size_bytes, 45e6, 500e-6)) for c in cases]
    fits = fit_tiers(compare(samples, LINKS), LINKS)
    spec = calibrated_system(load_system("dgx-h100-superpod"), fits, "bench.json", "netns")
    from tensorstage.hardware.system import write_system_yaml

    path = write_system_yaml(spec, tmp_path / "sys.yaml")
    fabric = fabric_from_system(load_system(path))
    assert fabric.tiers[0].bw_Bps == pytest.approx(45e6, rel=1e-6)
    assert fabric.tiers[0].latency_s == pytest.approx(500e-6, rel=1e-6)
    assert fabric.tiers[1].bw_Bps == fabric_from_system(load_system("dgx-h100-superpod")).tiers[1].bw_Bps
    assert "measured" in load_system(path).sources["network.nvlink.bandwidth_GBps"]


def test_calibrate_network_cli(tmp_path: Path) -> None:
    cases = bench_cases(N, N, ("all_gather", "send_recv"), (2**18, 2**20))
    doc = {"kind": "tensorstage-replay-bench", "network": "netns",
           "links": {"ranks": N, "node_size": N, "tiers": [{"name": "link", "rate_Bps": B, "latency_s": 0.0}]},
           "samples": [{"op": c.op, "group": c.group, "ranks": list(c.ranks), "size_bytes": c.size_bytes, "rep": 0,
                        "time_s": closed_form(c.op, len(c.ranks), c.size_bytes)} for c in cases]}
    assert bench_from_dict(doc)[0] == Links(N, N, (LinkTier("link", B, 0.0),))
    assert bench_from_dict(doc)[3] == "native"  # results without config.collectives ran gloo's own
    (tmp_path / "r.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["calibrate-network", str(tmp_path / "r.json"), "--system", "dgx-a100-selene",
                                   "--out", str(tmp_path / "s.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    fit = json.loads(res.output)["fit"][0]
    assert fit["bandwidth_Bps"] == pytest.approx(B) and fit["latency_s"] == pytest.approx(A)
    assert load_system(tmp_path / "s.yaml").name == "dgx-a100-selene-calibrated"


@pytest.mark.parametrize(("args", "field"), [
    (["replay", "--bench", "--sizes", "12Q"], "sizes"),
    (["replay", "--bench", "--ops", "broadcast"], "ops"),
    (["replay", "--bench", "--ranks", "8", "--node-size", "3", "--inter-GBps", "1"], "node_size"),
    (["replay", "--bench", "--network", "carrier-pigeon"], "network"),
    (["replay", "--bench", "--link-GBps", "0"], "link_GBps"),
    (["replay", "--bench", "--sizes", "64M", "--max-gib", "0.01"], "max_bytes"),
    (["replay", "--bench", "--sizes", "64M", "--link-GBps", "0.0001", "--timeout-s", "5"], "timeout_s"),
    (["replay"], "model"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--slice", "dp=9"], "slice"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--slice", "zz=0"], "slice"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--slice", "dp"], "slice"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--ranks", "3"], "ranks"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--scale", "0"], "scale"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--compute", "simulate"], "compute"),
    (["replay", "gpt3-125m", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "1024", "--scale", "1", "--max-gib", "0.01"], "scale"),
    (["replay", "--bench", "--tp", "2"], "bench"),
    (["replay", "--bench", "--collectives", "mpi"], "collectives"),
    (["replay", "--bench", "--link-latency-us", "-5"], "link_latency_us"),
    (["replay", "--bench", "--link-latency-us", "2e6"], "link_latency_us"),
    (["replay", "--bench", "--node-size", "4", "--inter-GBps", "1", "--inter-latency-us", "1e9"], "inter_latency_us"),
])
def test_bad_replay_input_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             args: list[str], field: str) -> None:
    if "--network" not in args:
        args = [*args, "--network", "loopback"]
    res = run_main(monkeypatch, capsys, *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"error: {field}:") and len(res.stderr.strip().splitlines()) == 1


def test_results_file_that_is_not_a_bench_result_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="results"):
        bench_from_dict({"kind": "something else"})
    with pytest.raises(SpecError, match="node_size"):
        make_links(8, 1.0, 0.0, node_size=8, inter_GBps=1.0)


def test_without_root_netns_is_a_one_line_error_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorstage.replay import bench, netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(SpecError, match="network: emulated links need root"):
        bench.choose_network("netns")
    mode, notes = bench.choose_network("auto")
    assert mode == "loopback" and "need root" in notes[0]
