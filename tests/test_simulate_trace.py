"""``simulate --trace``: Chakra ET files back into Programs (ours and another tool's), report files.

Hand-built TP x DP x PP 1F1B programs stand in for the lowering here; the step times they give
from the model side and from the written ET files must agree exactly. The foreign-trace test
builds ET files with protobuf directly and checks the step time against a closed form.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.errors import SpecError
from tensorstage.hardware import load_system
from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import CollKind, NodeKind, Program
from tensorstage.sim import execute, machine_from_system, simulate, summarize
from tensorstage.trace import schema, write_chakra
from tensorstage.trace.to_programs import infer_mesh, programs_from_trace

runner = CliRunner()
SYSTEM = "dgx-h100-superpod"


def pipeline_programs(tp: int = 2, dp: int = 2, pp: int = 4, m: int = 8) -> tuple[list[Program], Mesh]:
    """1F1B over ``pp`` stages; per micro-batch: matmul, norm, TP all-reduce, add; DP all-reduce + Adam."""
    mesh = Mesh.create([("tp", tp), ("dp", dp), ("pp", pp)])
    f, b, act = int(4e12), int(8e12), 2**24
    progs = []
    for s in range(pp):
        p = Program({"pp": s}, static_bytes={"weights": 2 * 10**9, "gradients": 4 * 10**9,
                                             "optimizer_states": 12 * 10**9}, model_flops=m * (f + b))
        warm = min(pp - s - 1, m)
        order = [("F", i) for i in range(warm)]
        for i in range(m - warm):
            order += [("F", warm + i), ("B", i)]
        order += [("B", i) for i in range(m - warm, m)]
        prev = None
        for kind, i in order:
            deps: tuple[int, ...] = ()
            if kind == "F" and s > 0:
                deps = (p.add(f"recv_f{i}", NodeKind.RECV, comm_bytes=act, peer_axis="pp", peer_offset=-1,
                              tag=2 * i, category="comm").id,)
            if kind == "B" and s < pp - 1:
                deps = (p.add(f"recv_b{i}", NodeKind.RECV, comm_bytes=act, peer_axis="pp", peer_offset=1,
                              tag=2 * i + 1, category="comm").id,)
            cat = "fwd" if kind == "F" else "bwd_input"
            n1 = p.add(f"{kind}{i}_mm", NodeKind.COMP, flops=f if kind == "F" else b, tensor_bytes=10**8,
                       op="einsum", data_deps=deps, ctrl_deps=(prev,) if prev is not None else (), category=cat,
                       mem_alloc_bytes=10**9 if kind == "F" else 0)
            n2 = p.add(f"{kind}{i}_norm", NodeKind.COMP, flops=10**12, tensor_bytes=10**6, op="norm",
                       data_deps=(n1.id,), category=cat)
            ar = p.add(f"{kind}{i}_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=act, axes=("tp",),
                       data_deps=(n2.id,), category="comm")
            n3 = p.add(f"{kind}{i}_out", NodeKind.COMP, flops=10**9, tensor_bytes=10**8, op="add",
                       data_deps=(ar.id,), category=cat, mem_free_bytes=10**9 if kind == "B" else 0)
            prev = n3.id
            if kind == "F" and s < pp - 1:
                p.add(f"send_f{i}", NodeKind.SEND, comm_bytes=act, peer_axis="pp", peer_offset=1, tag=2 * i,
                      data_deps=(n3.id,), category="comm")
            if kind == "B" and s > 0:
                p.add(f"send_b{i}", NodeKind.SEND, comm_bytes=act, peer_axis="pp", peer_offset=-1,
                      tag=2 * i + 1, data_deps=(n3.id,), category="comm")
        g = p.add("dp_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2 * 10**9, axes=("dp",),
                  data_deps=(prev,), category="comm")
        p.add("adam", NodeKind.COMP, flops=10**10, tensor_bytes=16 * 10**9, op="optimizer", category="optimizer",
              data_deps=(g.id,))
        progs.append(p)
    return progs, mesh


@pytest.fixture(scope="module")
def direct() -> tuple[list[Program], Mesh, object]:
    progs, mesh = pipeline_programs()
    res = simulate(progs, mesh, load_system(SYSTEM, mesh.world), tokens_per_step=4096)
    return progs, mesh, res


@pytest.mark.parametrize("classes_only", [False, True])
def test_our_trace_gives_the_same_step(tmp_path: Path, direct, classes_only: bool) -> None:
    progs, mesh, res = direct
    d = tmp_path / "tr"
    write_chakra(progs, mesh, d, json=True, classes_only=classes_only, progress=False,
                 inputs={"system": SYSTEM, "tokens_per_step": 4096})
    out = runner.invoke(app, ["simulate", "--trace", str(d), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["step_time_s"] == pytest.approx(res.step_time_s, rel=1e-12)
    assert data["peak_memory_bytes"] == res.peak_memory_bytes
    assert data["mfu"] == pytest.approx(res.mfu, rel=1e-12)
    assert data["tokens_per_s"] == pytest.approx(4096 / res.step_time_s, rel=1e-12)
    # the programs decoded from the ET files are the written ones, field by field
    back = programs_from_trace(d)
    assert back.annotated and back.source == "tensorstage"
    for a, b in zip(progs, back.programs, strict=True):
        assert a.class_key == b.class_key and a.static_bytes == b.static_bytes and a.model_flops == b.model_flops
        assert a.nodes == b.nodes


def test_our_trace_without_side_files_times_every_node_as_matmul(tmp_path: Path, direct) -> None:
    res = direct[2]
    progs, mesh = pipeline_programs()
    d = tmp_path / "tr"
    write_chakra(progs, mesh, d, progress=False, inputs={"system": SYSTEM})
    back = programs_from_trace(d)
    assert not back.annotated and back.notes
    # the norm nodes (1e12 FLOPs, compute bound) now run at the tensor rate instead of the vector rate
    machine = machine_from_system(load_system(SYSTEM, mesh.world))
    for p in progs:
        for n in p.nodes:
            if n.op == "norm":
                n.op = ""
    expect = summarize(execute(progs, mesh, machine)).step_time_s
    got = summarize(execute(back.programs, back.mesh, machine)).step_time_s
    assert got == pytest.approx(expect, rel=1e-12)
    assert got < res.step_time_s


def _foreign_trace(d: Path, us: int, nbytes: int) -> None:
    """Two ranks: a 'compute' node with a fixed duration, then an all-reduce over both (ids out of order)."""
    d.mkdir()
    for rank in (0, 1):
        nodes = []
        ar = schema.Node(id=7, name="allreduce", type=schema.COMM_COLL_NODE, data_deps=[3])
        ar.attr.add(name="comm_type", int64_val=schema.ALL_REDUCE)
        ar.attr.add(name="comm_size", int64_val=nbytes)
        ar.attr.add(name="pg_name", string_val="1")
        comp = schema.Node(id=3, name="gemm", type=schema.COMP_NODE, duration_micros=us)
        comp.attr.add(name="num_ops", int64_val=10**9)
        comp.attr.add(name="tensor_size", int64_val=10**6)
        cpu = schema.Node(id=9, name="cpu", type=schema.COMP_NODE, data_deps=[7])
        cpu.attr.add(name="is_cpu_op", bool_val=True)
        nodes = [ar, comp, cpu]
        md = schema.GlobalMetadata(version="0.0.4").SerializeToString()
        blob = bytearray()
        for msg in [md, *(n.SerializeToString() for n in nodes)]:
            size = len(msg)
            while size >= 0x80:
                blob.append((size & 0x7F) | 0x80)
                size >>= 7
            blob.append(size)
            blob += msg
        (d / f"other.{rank}.et").write_bytes(bytes(blob))
    (d / "other_comm_groups.json").write_text(json.dumps({"1": [0, 1]}))


def test_foreign_trace_closed_form(tmp_path: Path) -> None:
    d = tmp_path / "foreign"
    us, nbytes = 250, 64 * 2**20
    _foreign_trace(d, us, nbytes)
    out = runner.invoke(app, ["simulate", "--trace", str(d), "--system", SYSTEM, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    fab = machine_from_system(load_system(SYSTEM, 2)).fabric
    nvl = fab.tiers[0]  # both ranks in one NVSwitch domain: ring (plus NCCL's base latency) or NVLS
    ring = fab.ring_base_latency_s + 2 * (2 - 1) / 2 * nbytes / nvl.bw_Bps + 2 * (2 - 1) * nvl.latency_s
    nvls = nbytes / nvl.nvls_bw_Bps + 2 * nvl.latency_s
    t_ar = min(ring, nvls)
    # fixed duration (no roofline, no launch overhead), then the all-reduce; the CPU op costs nothing
    assert data["step_time_s"] == pytest.approx(us * 1e-6 + t_ar, rel=1e-12)
    assert [c["ranks"] for c in data["breakdown"]["classes"]] == [2]  # both ranks identical: one class


def test_infer_mesh_from_megatron_groups() -> None:
    # tp=2 (adjacent), dp=2 (stride 2), pp=2 (stride 4): the groups a Megatron layout produces
    groups = {"1": [0, 1], "2": [2, 3], "3": [4, 5], "4": [6, 7], "5": [0, 2], "6": [1, 3], "7": [4, 6],
              "8": [5, 7], "9": [0, 4], "10": [1, 5], "11": [0, 1, 4, 5]}
    mesh, axes = infer_mesh(8, groups)
    assert [(a.size, a.stride) for a in mesh.views["base"]] == [(2, 1), (2, 2), (2, 4)]
    assert axes["1"] == ("a0",) and axes["5"] == ("a1",) and axes["9"] == ("a2",)
    assert axes["11"] == ("a0", "a2")
    with pytest.raises(SpecError, match="strided box"):
        infer_mesh(8, {"1": [0, 1, 3]})
    with pytest.raises(SpecError, match="nest"):
        infer_mesh(12, {"1": [0, 2], "2": [0, 3]})


def test_trace_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--trace", str(tmp_path / "missing")], ["--trace", str(tmp_path)]):
        out = runner.invoke(app, ["simulate", *args, "--system", SYSTEM])
        assert out.exit_code != 0
        assert isinstance(out.exception, SpecError)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.0.et").write_bytes(b"\xff\xff\xff")
    with pytest.raises(SpecError, match="decode"):
        programs_from_trace(d)


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_report_files_are_deterministic(tmp_path: Path, direct) -> None:
    progs, mesh, _ = direct
    d = tmp_path / "tr"
    write_chakra(progs, mesh, d, json=True, progress=False, inputs={"system": SYSTEM, "tokens_per_step": 4096})
    digests = []
    for i in range(2):
        rep = tmp_path / f"rep{i}"
        out = runner.invoke(app, ["simulate", "--trace", str(d), "--report", str(rep), "--timeline",
                                  str(tmp_path / f"t{i}.json")])
        assert out.exit_code == 0, out.output
        digests.append(_digest(rep))
    assert set(digests[0]) == {"report.md", "report.html", "timeline.png", "time_breakdown.png",
                               "memory_breakdown.png"}
    assert digests[0] == digests[1]
    assert (tmp_path / "t0.json").read_bytes() == (tmp_path / "t1.json").read_bytes()
    md = (tmp_path / "rep0" / "report.md").read_text()
    assert "![pipeline timeline](timeline.png)" in md and "pp=3" in md
    assert b"matplotlib" not in (tmp_path / "rep0" / "timeline.png").read_bytes()
    trace = json.loads((tmp_path / "t0.json").read_text())
    assert trace["traceEvents"]


def test_foreign_per_rank_files_group_into_stage_classes(tmp_path: Path, direct) -> None:
    """Our per-rank files without manifest or side files read as another tool's: the mesh comes
    from the comm groups, identical ranks are grouped (one class per pipeline stage), and the step
    time is the direct one (every COMP op of the hand-built program is charged alike here)."""
    progs, mesh = pipeline_programs()
    for p in progs:
        for n in p.nodes:
            n.op = "matmul" if n.kind == NodeKind.COMP else n.op
    machine = machine_from_system(load_system(SYSTEM, mesh.world))
    expect = summarize(execute(progs, mesh, machine)).step_time_s
    d = tmp_path / "tr"
    write_chakra(progs, mesh, d, progress=False)
    (d / "manifest.json").unlink()
    back = programs_from_trace(d)
    assert back.source == "chakra" and len(back.programs) == 4
    assert [p.class_key for p in back.programs] == [{"a2": s} for s in range(4)]  # tp=a0, dp=a1, pp=a2
    got = summarize(execute(back.programs, back.mesh, machine))
    assert got.step_time_s == pytest.approx(expect, rel=1e-12)
    assert [c.ranks for c in got.classes] == [4, 4, 4, 4]
