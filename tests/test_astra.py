"""ASTRA-sim inputs: traces every mode can run, and network/system files that match the presets.

Expected numbers are the presets' datasheet values and the documented efficiencies written out
here (hardware/systems.yaml, hardware/presets.yaml, sim/machine.py LINK_EFFICIENCY), and ASTRA-sim's
own formulas (analytical backend: a message costs ``hops * latency + bytes / (GB/s * 2^30 / 1e9)``
ns, a ``Switch`` path is 2 hops; system layer: roofline ``num_ops / min(peak, bw * num_ops /
tensor_size)``; replay: ``duration_micros``), never the functions under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support import megatron_gpt, run_main

from tensorstage.hardware import load_system
from tensorstage.lower import lower
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import NodeKind
from tensorstage.sim.collectives import p2p_time_s, ring_all_reduce_s
from tensorstage.sim.durations import compute_durations_us, node_time_s
from tensorstage.sim.machine import fabric_from_system
from tensorstage.trace import node_attrs, read_chakra, validate_trace_dir, write_chakra
from tensorstage.trace.astra_config import astra_config, write_astra_config

GIB = 2**30
# dgx-h100-superpod preset: NVLink 450 GB/s per direction, NDR 50 GB/s per GPU, 3.4 us / 2 us per message
H100_NVLINK_GBPS, H100_IB_GBPS, H100_NVLINK_LAT_NS, H100_IB_LAT_NS = 450.0, 50.0, 3400.0, 2000.0
# link efficiencies (sim/machine.py LINK_EFFICIENCY): scale-up 0.80, scale-out 0.90
EFF_UP, EFF_OUT = 0.80, 0.90
# H100-SXM: 989 TFLOP/s dense bf16 x 0.80 matmul efficiency; 3,350 GB/s HBM x 0.90
H100_PEAK_TFLOPS, H100_HBM_GBPS = 989.0 * 0.80, 3350.0 * 0.90


def _astra_message_ns(net: dict, dim: int, size_bytes: float) -> float:
    """ASTRA analytical backend, congestion-unaware: hops x link latency + bytes / bandwidth."""
    hops = 2 if net["topology"][dim] == "Switch" else 1
    return hops * net["latency"][dim] + size_bytes / (net["bandwidth"][dim] * GIB / 1e9)


def test_network_yml_matches_preset_bandwidth_and_latency(tmp_path: Path) -> None:
    cfg = astra_config(load_system("dgx-h100-superpod", 1024))
    files = write_astra_config(cfg, tmp_path, "T/trace", "T/trace_comm_groups.json")
    net = yaml.safe_load(files["network"].read_text())
    assert net == cfg.network
    assert net["topology"] == ["Switch", "Switch"] and net["npus_count"] == [8, 128]
    assert net["bandwidth"] == pytest.approx([H100_NVLINK_GBPS * EFF_UP * 1e9 / GIB,
                                              H100_IB_GBPS * EFF_OUT * 1e9 / GIB], abs=1e-5)
    # a Switch message crosses two links: half the per-message latency per link
    assert net["latency"] == [H100_NVLINK_LAT_NS / 2, H100_IB_LAT_NS / 2]
    # ASTRA's time for one 4 MB message inside a node = our alpha + bytes / achievable bandwidth
    size = 4e6
    ours_ns = (H100_NVLINK_LAT_NS * 1e-9 + size / (H100_NVLINK_GBPS * 1e9 * EFF_UP)) * 1e9
    assert _astra_message_ns(net, 0, size) == pytest.approx(ours_ns, rel=1e-6)
    assert p2p_time_s(size, 0, fabric_from_system(load_system("dgx-h100-superpod", 1024))) * 1e9 == pytest.approx(
        ours_ns, rel=1e-6)


def test_ring_all_reduce_in_astra_terms_equals_ours() -> None:
    """ASTRA ring all-reduce, one chunk: 2(n-1) steps of one S/n message each."""
    cfg = astra_config(load_system("dgx-h100-superpod", 8))
    n, size = 8, 256e6
    astra_ns = 2 * (n - 1) * _astra_message_ns(cfg.network, 0, size / n)
    ours_s = ring_all_reduce_s(n, size, H100_NVLINK_GBPS * 1e9 * EFF_UP, H100_NVLINK_LAT_NS * 1e-9)
    assert astra_ns == pytest.approx(ours_s * 1e9, rel=1e-6)
    assert cfg.network["npus_count"] == [8]  # the 1-node scale-out dimension carries nothing and is left out


def test_fully_connected_dimension_is_per_peer_link_one_hop() -> None:
    # mi300x-node: xGMI 64 GB/s per direction to each of 7 peers, 0.5 us; IB 50 GB/s, 2 us
    cfg = astra_config(load_system("mi300x-node", 16))
    net, sysj = cfg.network, cfg.system
    assert net["topology"] == ["FullyConnected", "Switch"] and net["npus_count"] == [8, 2]
    assert net["bandwidth"] == pytest.approx([64.0 * EFF_UP * 1e9 / GIB, 50.0 * EFF_OUT * 1e9 / GIB], abs=1e-5)
    assert net["latency"] == [500.0, 1000.0]
    assert sysj["all-reduce-implementation"] == ["direct", "ring"]
    assert sysj["all-to-all-implementation"] == ["direct", "direct1"]


def test_system_json_roofline_and_chunking(tmp_path: Path) -> None:
    cfg = astra_config(load_system("dgx-h100-superpod", 64))
    files = write_astra_config(cfg, tmp_path, "T/trace", "T/groups.json")
    replay = json.loads(files["system"].read_text())
    roof = json.loads(files["system_roofline"].read_text())
    assert replay["peak-perf"] == roof["peak-perf"] == pytest.approx(H100_PEAK_TFLOPS)
    assert roof["local-mem-bw"] == pytest.approx(H100_HBM_GBPS)
    assert (replay["roofline-enabled"], roof["roofline-enabled"]) == (0, 1)
    assert {k: v for k, v in roof.items() if k not in ("roofline-enabled", "local-mem-bw")} == {
        k: v for k, v in replay.items() if k not in ("roofline-enabled", "local-mem-bw")}
    assert replay["preferred-dataset-splits"] == replay["active-chunks-per-dimension"] == 1
    assert replay["endpoint-delay"] >= 1  # 0 aborts ASTRA-sim's event queue (same-time event assertion)
    assert replay["all-gather-implementation"] == ["ring", "ring"]
    assert json.loads(files["remote_memory"].read_text()) == {"memory-type": "NO_MEMORY_EXPANSION"}
    cmds = files["commands"].read_text().splitlines()
    assert any(c.startswith("AstraSim_Analytical_Congestion_Unaware --workload-configuration=T/trace "
                            "--comm-group-configuration=T/groups.json") and c.endswith("network.yml") for c in cmds)


def _astra_reduce_step_ns(local_mem_bw_GBps: float, step_bytes: float) -> int:
    """ASTRA-sim ``PacketBundle::call``: a reduce step waits two reads and a write of its bytes at
    ``local-mem-bw`` (GB/s, stored x 1e9), each term truncated to whole ns."""
    return 3 * int(step_bytes / (local_mem_bw_GBps * 1e9) * 1e9)


def test_replay_system_json_hides_astra_reduction_charge() -> None:
    """Our collectives charge no reduction time (NCCL pipelines it behind the link); replay mode
    must not either, while the roofline file keeps HBM for its compute roofline."""
    cfg = astra_config(load_system("dgx-h100-superpod", 8))
    step_bytes = 256e6 / 8  # one step of a 256 MB ring reduce-scatter over 8 GPUs
    assert _astra_reduce_step_ns(cfg.system["local-mem-bw"], step_bytes) == 0
    # with HBM (3.35 TB/s x 0.9) the same step would wait 3 x 32e6 / 3.015e12 s = 31.8 us
    assert _astra_reduce_step_ns(cfg.system_roofline["local-mem-bw"], step_bytes) == pytest.approx(
        3 * 32e6 / (3350e9 * 0.9) * 1e9, abs=3)


# --- traces --------------------------------------------------------------------------------------

DECODE = ParallelPlan(tp=2, pp=2, dp=1, phase="decode", seq=64, context=64, global_batch=4, micro_batch=1)
TRAIN = ParallelPlan(tp=2, pp=2, dp=2, zero=1, seq=128, global_batch=8, micro_batch=1)


def _comp_nodes(directory: Path, world: int) -> list:
    out = []
    for r in range(world):
        _, nodes = read_chakra(directory / f"trace.{r}.et")
        out += [n for n in nodes if n.type == int(NodeKind.COMP)]
    return out


@pytest.mark.parametrize("plan", [DECODE, TRAIN], ids=["decode", "train"])
def test_every_compute_node_runs_in_roofline_mode(tmp_path: Path, plan: ParallelPlan) -> None:
    low = lower(megatron_gpt(), plan)
    manifest = write_chakra(low.programs, low.mesh, tmp_path / "t", progress=False, json=True)
    assert manifest["compute_durations"]["present"] is False
    report = validate_trace_dir(tmp_path / "t")  # every dependency exists, no cycle, types as ASTRA reads
    assert report.ok, report.errors[:3]
    memory_only = [n for p in low.programs for n in p.nodes if n.kind == NodeKind.COMP and n.flops == 0
                   and n.tensor_bytes > 0]
    if plan.phase == "decode":
        assert memory_only  # the embedding gather: the node that used to hang ASTRA's roofline
    hbm_Bps = H100_HBM_GBPS * 1e9
    for n in _comp_nodes(tmp_path / "t", plan.world):
        a = node_attrs(n)
        assert a["num_ops"] >= 1 and a["tensor_size"] >= 1
        # ASTRA roofline: num_ops / min(peak, bw * num_ops / tensor_size) is finite; with num_ops = 1
        # it is the memory time tensor_size / bw
        t_s = a["num_ops"] / min(H100_PEAK_TFLOPS * 1e12, hbm_Bps * a["num_ops"] / a["tensor_size"])
        assert t_s >= a["tensor_size"] / hbm_Bps * (1 - 1e-12)


def test_durations_from_our_compute_model(tmp_path: Path) -> None:
    low = lower(megatron_gpt(), TRAIN)
    from tensorstage.sim.durations import duration_micros_fn
    from tensorstage.sim.machine import machine_from_system

    compute = machine_from_system(load_system("dgx-h100-superpod", 8), "bf16").compute

    manifest = write_chakra(low.programs, low.mesh, tmp_path / "t", progress=False,
                            duration_micros=duration_micros_fn(low.programs, compute), durations_info={"system": "x"})
    assert manifest["compute_durations"] == {"present": True, "system": "x"}
    for prog in low.programs:
        exact_us = [node_time_s(compute, n) * 1e6 for n in prog.nodes
                    if n.kind == NodeKind.COMP]
        got = list(compute_durations_us(prog, compute).values())
        assert all(abs(g - e) < 1.0 for g, e in zip(got, exact_us, strict=True))
        running = 0.0
        for i, e in enumerate(exact_us):  # every prefix total within half a microsecond
            running += e
            assert abs(sum(got[: i + 1]) - running) <= 0.5 + 1e-9
    # the engine (no overlap slowdown) charges each class's compute exactly the durations' total
    from dataclasses import replace

    from tensorstage.sim.engine import execute
    from tensorstage.sim.machine import machine_from_system

    machine = replace(machine_from_system(load_system("dgx-h100-superpod", 8), "bf16"), overlap_slowdown=0.0)
    assert machine.compute == compute
    ex = execute(low.programs, low.mesh, machine)
    for c, prog in enumerate(low.programs):
        busy = sum(ex.end[ex.offsets[c] + n.id] - ex.start[ex.offsets[c] + n.id] for n in prog.nodes
                   if n.kind == NodeKind.COMP)
        assert sum(compute_durations_us(prog, compute).values()) == pytest.approx(busy * 1e6, abs=0.5 + 1e-6)
    # replay mode: every COMP node has a duration or num_ops >= 1; the file carries the durations
    rank0 = _comp_nodes(tmp_path / "t", 1)
    assert sum(n.duration_micros for n in rank0) == pytest.approx(
        sum(node_time_s(compute, n) for n in low.programs[0].nodes
            if n.kind == NodeKind.COMP) * 1e6, abs=0.5)


def test_generate_with_system_and_astra_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g"
    r = run_main(monkeypatch, capsys, "generate", "gpt3-125m", "--tp", "2", "--dp", "2", "--pp", "1", "--seq", "128",
                 "--global-batch", "4", "--micro-batch", "1", "--system", "dgx-h100-superpod", "--astra-config",
                 "--workers", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compute_durations"]["present"] is True and manifest["inputs"]["system"] == "dgx-h100-superpod"
    assert all(n.duration_micros >= 0 for n in _comp_nodes(out, 4))
    assert sum(n.duration_micros for n in _comp_nodes(out, 1)) > 0
    net = yaml.safe_load((out / "network.yml").read_text())
    assert net["npus_count"] == [4]
    cmds = (out / "astra_commands.sh").read_text()
    assert f"--workload-configuration={out}/trace " in cmds
    assert f"--comm-group-configuration={out}/trace_comm_groups.json " in cmds


def test_astra_config_cli_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    r = run_main(monkeypatch, capsys, "astra-config", "--system", "dgx-b200", "--ranks", "16", "--out",
                 str(tmp_path / "a"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    # dgx-b200: NVLink5 900 GB/s per direction, 8 per node; 2 nodes
    assert info["network"]["npus_count"] == [8, 2]
    assert info["network"]["bandwidth"][0] == pytest.approx(900.0 * EFF_UP * 1e9 / GIB, abs=1e-5)
    for args, field in [(("--system", "dgx-h999", "--ranks", "8"), "system"),
                        (("--system", "dgx-h100-superpod"), "ranks"),
                        (("--system", "dgx-h100-superpod", "--ranks", "12"), "num_gpus"),
                        (("--system", "dgx-h100-superpod", "--trace", str(tmp_path)), "trace")]:
        r = run_main(monkeypatch, capsys, "astra-config", *args, "--out", str(tmp_path / "b"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and field in r.stderr, r.stderr
    r = run_main(monkeypatch, capsys, "generate", "gpt3-125m", "--tp", "2", "--astra-config", "--out",
                 str(tmp_path / "c"))
    assert r.returncode == 2 and "astra-config" in r.stderr and not (tmp_path / "c").exists()
    for extra, field in [(("--system", "dgx-h999"), "system"),
                         (("--system", "dgx-h100-superpod", "--astra-config", "--classes-only"), "astra-config")]:
        r = run_main(monkeypatch, capsys, "generate", "gpt3-125m", "--tp", "2", *extra, "--out", str(tmp_path / "d"))
        assert r.returncode == 2 and field in r.stderr and not (tmp_path / "d").exists(), r.stderr


def test_validator_flags_compute_node_astra_cannot_time() -> None:
    from tensorstage.trace import schema
    from tensorstage.trace.reader import check_nodes

    bad = schema.Node(id=0, name="gather", type=int(NodeKind.COMP))
    bad.attr.add(name="num_ops", int64_val=0)
    bad.attr.add(name="tensor_size", int64_val=4096)
    timed = schema.Node(id=1, name="gather", type=int(NodeKind.COMP), duration_micros=3, data_deps=[0])
    timed.attr.add(name="num_ops", int64_val=0)
    timed.attr.add(name="tensor_size", int64_val=4096)
    errors = check_nodes([bad, timed], "f")
    assert len(errors) == 1 and "node 0 has num_ops < 1" in errors[0]
