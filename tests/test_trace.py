"""Chakra ET writer/reader: wire format, stamping, group membership, determinism, atomicity."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tensorstage.parallel.mesh import Communicators, Mesh
from tensorstage.schedule.program import CollKind, NodeKind, Program
from tensorstage.trace import node_attrs, read_chakra, schema, validate_trace_dir, write_chakra
from tensorstage.trace import writer as writer_mod
from tensorstage.trace.encode import ClassTemplate, encode_rank_reference, varint

# Sizes used by the hand-built programs (bytes / FLOPs), named so the totals test can re-add them.
ACT_BYTES = 4096 * 2  # activation sent between stages
GRAD_BYTES = 4096 * 2
TP_AR_BYTES = 4096 * 2
EP_A2A_BYTES = 3 * 1024
DP_AR_BYTES = 1 << 20
FWD_FLOPS, BWD_FLOPS = 2 * 64 * 64 * 64, 4 * 64 * 64 * 64
FWD_BYTES, BWD_BYTES = 3 * 64 * 64 * 2, 6 * 64 * 64 * 2


def mesh_2x4x2() -> Mesh:
    """tp 2 (innermost), dp 4, pp 2 -> 16 ranks; expert view carves dp into ep 2 x edp 2."""
    return Mesh.create([("tp", 2), ("dp", 4), ("pp", 2)],
                       refactor={"expert": (("dp",), (("ep", 2), ("edp", 2)))})


def stage_program(stage: int, pp: int = 2, name_suffix: str = "") -> Program:
    """A 2-stage pipeline stage: fwd, TP all-reduce, EP all-to-all, p2p, bwd, DP all-reduce."""
    p = Program(class_key={"pp": stage})
    first, last = stage == 0, stage == pp - 1
    deps: tuple[int, ...] = ()
    if not first:
        deps = (p.add("recv_act", NodeKind.RECV, comm_bytes=ACT_BYTES, peer_axis="pp", peer_offset=-1,
                      tag=100 + stage).id,)
    f = p.add("fwd_mlp" + name_suffix, NodeKind.COMP, data_deps=deps, flops=FWD_FLOPS, tensor_bytes=FWD_BYTES)
    ar = p.add("tp_allreduce_fwd", NodeKind.COLL, data_deps=(f.id,), comm=CollKind.ALL_REDUCE,
               comm_bytes=TP_AR_BYTES, axes=("tp",))
    a2a = p.add("ep_dispatch", NodeKind.COLL, data_deps=(ar.id,), comm=CollKind.ALL_TO_ALL,
                comm_bytes=EP_A2A_BYTES, axes=("ep",))
    last_id = a2a.id
    if not last:
        s = p.add("send_act", NodeKind.SEND, data_deps=(a2a.id,), comm_bytes=ACT_BYTES, peer_axis="pp",
                  peer_offset=1, tag=100 + stage + 1)
        r = p.add("recv_grad", NodeKind.RECV, ctrl_deps=(s.id,), comm_bytes=GRAD_BYTES, peer_axis="pp",
                  peer_offset=1, tag=200 + stage)
        last_id = r.id
    b = p.add("bwd_mlp", NodeKind.COMP, data_deps=(last_id,), flops=BWD_FLOPS, tensor_bytes=BWD_BYTES,
              category="bwd_input")
    if not first:
        p.add("send_grad", NodeKind.SEND, data_deps=(b.id,), comm_bytes=GRAD_BYTES, peer_axis="pp",
              peer_offset=-1, tag=200 + stage - 1)
    p.add("dp_allreduce", NodeKind.COLL, data_deps=(b.id,), comm=CollKind.ALL_REDUCE, comm_bytes=DP_AR_BYTES,
          axes=("dp",))
    return p


def programs_2stage() -> list[Program]:
    return [stage_program(1), stage_program(0)]  # deliberately unsorted


def dir_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# --- schema: independent wire facts ---------------------------------------------------------------

def test_wire_bytes_match_hand_encoding() -> None:
    """Field numbers checked against bytes written by hand from the Chakra facts sheet."""
    n = schema.Node(id=1, name="a", type=schema.COMM_COLL_NODE, ctrl_deps=[2], data_deps=[0, 300])
    n.attr.add(name="pg_name", string_val="7")
    # id=1 (0x08), name=2 (0x12), type=3 (0x18) 7, ctrl_deps=4 packed (0x22), data_deps=5 packed (0x2a)
    # attr=10 (0x52) { name=1 (0x0a) "pg_name", string_val=29 -> tag (29<<3|2)=234 -> ea 01 }
    expected = (b"\x08\x01" + b"\x12\x01a" + b"\x18\x07" + b"\x22\x01\x02" + b"\x2a\x03\x00\xac\x02"
                + b"\x52\x0d" + b"\x0a\x07pg_name" + b"\xea\x01\x017")
    assert n.SerializeToString() == expected
    a = schema.AttributeProto(name="x", int64_val=5)
    assert a.SerializeToString() == b"\x0a\x01x" + bytes([9 << 3]) + b"\x05"
    a = schema.AttributeProto(name="x", bool_val=False)  # oneof member: present even when false
    assert a.SerializeToString() == b"\x0a\x01x" + bytes([27 << 3 & 0x7F | 0x80, 27 >> 4]) + b"\x00"
    md = schema.GlobalMetadata(version="0.0.4")
    assert md.SerializeToString() == b"\x0a\x050.0.4"


def test_enum_values_match_facts_sheet() -> None:
    assert schema.enum_values("NodeType") == {
        "INVALID_NODE": 0, "METADATA_NODE": 1, "MEM_LOAD_NODE": 2, "MEM_STORE_NODE": 3, "COMP_NODE": 4,
        "COMM_SEND_NODE": 5, "COMM_RECV_NODE": 6, "COMM_COLL_NODE": 7}
    assert schema.enum_values("CollectiveCommType") == {
        "ALL_REDUCE": 0, "REDUCE": 1, "ALL_GATHER": 2, "GATHER": 3, "SCATTER": 4, "BROADCAST": 5,
        "ALL_TO_ALL": 6, "REDUCE_SCATTER": 7, "REDUCE_SCATTER_BLOCK": 8, "BARRIER": 9}
    for kind in NodeKind:
        assert schema.enum_values("NodeType")[{"COMP": "COMP_NODE", "SEND": "COMM_SEND_NODE",
                                               "RECV": "COMM_RECV_NODE", "COLL": "COMM_COLL_NODE"}[kind.name]] == kind
    for kind in CollKind:
        assert schema.enum_values("CollectiveCommType")[kind.name] == kind


def test_parser_matches_protoc(tmp_path: Path) -> None:
    """The import-time parser yields exactly protoc's FileDescriptorProto. protoc comes from
    grpcio-tools (the ``test`` extra), so this oracle always runs: a missing install fails here."""
    from google.protobuf import descriptor_pb2

    proto_dir = Path(schema.__file__).parent
    out = tmp_path / "et_def.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}",
                    "et_def.proto"], check=True)
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert fds.file[0] == schema.FILE_DESCRIPTOR


# --- stamping -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dp", [4, 80])
def test_template_stamp_is_byte_identical_to_naive_encoding(dp: int) -> None:
    """dp=80 -> 320 ranks: group ids and peers cross the 1- to 2-byte varint boundary."""
    mesh = Mesh.create([("tp", 2), ("dp", dp), ("pp", 2)],
                       refactor={"expert": (("dp",), (("ep", 2), ("edp", dp // 2)))})
    progs = sorted(programs_2stage(), key=lambda p: p.class_key["pp"])
    progs[0].nodes[0].name = "fwd 100% <ok>"  # '%' must survive the format-string splice
    comms = Communicators.number(mesh, sorted({k for p in progs for k in p.communicator_kinds()}))
    templates = [ClassTemplate.build(p, i, mesh) for i, p in enumerate(progs)]
    for rank in range(mesh.world):
        c = mesh.coord(rank, "pp")
        assert templates[c].stamp(rank, mesh, comms) == encode_rank_reference(progs[c], c, rank, mesh, comms)


def test_writer_rejects_broken_program_invariants() -> None:
    mesh = mesh_2x4x2()
    progs = programs_2stage()
    progs[1].nodes[1].data_deps = (42,)
    with pytest.raises(ValueError, match="invariant"):
        write_chakra(progs, mesh, "/nonexistent/never", progress=False)


def test_size_one_collective_is_rejected() -> None:
    mesh = Mesh.create([("tp", 1), ("dp", 2)])
    p = Program(class_key={})
    p.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=8, axes=("tp",))
    with pytest.raises(ValueError, match="size 1"):
        ClassTemplate.build(p, 0, mesh)


def test_varint() -> None:
    assert varint(0) == b"\x00" and varint(127) == b"\x7f" and varint(128) == b"\x80\x01"
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"


# --- full write / read back -----------------------------------------------------------------------

def _expected_group(rank: int, axes: str) -> set[int]:
    """Group members by brute force over coordinates (independent of Mesh.group_ranks)."""
    tp, dp, pp = rank % 2, (rank // 2) % 4, rank // 8
    edp = dp // 2  # ep = dp % 2 (inner), edp = dp // 2 (outer)
    out = set()
    for r in range(16):
        t, d, p = r % 2, (r // 2) % 4, r // 8
        ed = d // 2
        same = {"tp": (d, p) == (dp, pp), "dp": (t, p) == (tp, pp), "ep": (t, ed, p) == (tp, edp, pp)}[axes]
        if same:
            out.add(r)
    return out


def test_write_read_back_every_field(tmp_path: Path) -> None:
    mesh = mesh_2x4x2()
    progs = programs_2stage()
    out = tmp_path / "tr"
    manifest = write_chakra(progs, mesh, out, workers=1, progress=False, inputs={"model": "toy"})
    groups = json.loads((out / "trace_comm_groups.json").read_text())
    assert all(k.isdigit() and int(k) >= 1 for k in groups)
    by_stage = {p.class_key["pp"]: p for p in progs}
    for rank in range(16):
        meta, nodes = read_chakra(out / f"trace.{rank}.et")
        assert meta.version == "0.0.4"
        prog = by_stage[rank // 8]
        assert len(nodes) == len(prog.nodes)
        for n, ref in zip(nodes, prog.nodes, strict=True):
            a = node_attrs(n)
            assert (n.id, n.name, n.type) == (ref.id, ref.name, int(ref.kind))
            assert list(n.data_deps) == list(ref.data_deps) and list(n.ctrl_deps) == list(ref.ctrl_deps)
            assert a["is_cpu_op"] is False
            for at in n.attr:
                if at.name != "pg_name" and at.name != "is_cpu_op":
                    assert at.WhichOneof("value") == "int64_val"
            if ref.kind == NodeKind.COMP:
                assert (a["num_ops"], a["tensor_size"]) == (ref.flops, ref.tensor_bytes)
            elif ref.kind == NodeKind.COLL:
                assert (a["comm_type"], a["comm_size"]) == (int(ref.comm), ref.comm_bytes)
                assert isinstance(a["pg_name"], str)
                assert set(groups[a["pg_name"]]) == _expected_group(rank, ref.axes[0])
            else:
                peer = rank + 8 * ref.peer_offset
                src, dst = (rank, peer) if ref.kind == NodeKind.SEND else (peer, rank)
                assert (a["comm_src"], a["comm_dst"], a["comm_tag"], a["comm_size"]) == (
                    src, dst, ref.tag, ref.comm_bytes)
    report = validate_trace_dir(out)
    assert report.errors == [] and report.ranks == 16 and report.nodes == 16 * 7  # 7 nodes per stage
    assert manifest["world"] == 16 and manifest["inputs"] == {"model": "toy"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # Totals re-added from the constants above (stage 0 sends act / receives grad; stage 1 reverse).
    c0, c1 = manifest["classes"]["0"], manifest["classes"]["1"]
    assert c0["key"] == {"pp": 0} and c1["key"] == {"pp": 1}
    assert c0["flops"] == c1["flops"] == FWD_FLOPS + BWD_FLOPS
    assert c0["tensor_bytes"] == FWD_BYTES + BWD_BYTES
    assert c0["collective_bytes"] == {"ALL_REDUCE": {"tp": TP_AR_BYTES, "dp": DP_AR_BYTES},
                                      "ALL_TO_ALL": {"ep": EP_A2A_BYTES}}
    assert (c0["send_bytes"], c0["recv_bytes"], c1["send_bytes"], c1["recv_bytes"]) == (
        ACT_BYTES, GRAD_BYTES, GRAD_BYTES, ACT_BYTES)
    assert c0["node_counts"] == {"COMP": 2, "COLL": 3, "SEND": 1, "RECV": 1}
    assert manifest["ranks_per_class"] == 8 and manifest["files"]["count"] == 16
    assert manifest["files"]["bytes"] == sum((out / f"trace.{r}.et").stat().st_size for r in range(16))
    # 4 tp-groups... per kind: tp 8 groups of 2, dp 4 groups of 4, ep 8 groups of 2
    assert sorted(len(v) for v in groups.values()) == [2] * 16 + [4] * 4


def test_workers_do_not_change_bytes(tmp_path: Path) -> None:
    mesh = mesh_2x4x2()
    write_chakra(programs_2stage(), mesh, tmp_path / "w1", workers=1, progress=False, json=True)
    write_chakra(programs_2stage(), mesh, tmp_path / "w2", workers=2, progress=False, json=True)
    assert dir_digest(tmp_path / "w1") == dir_digest(tmp_path / "w2")
    assert len(list((tmp_path / "w1").glob("trace.*.et"))) == 16
    readable = json.loads((tmp_path / "w1" / "trace.class1.json").read_text())
    assert readable["key"] == {"pp": 1} and readable["nodes"][0]["peer_offset"] == -1


def test_classes_only(tmp_path: Path) -> None:
    mesh = mesh_2x4x2()
    write_chakra(programs_2stage(), mesh, tmp_path / "full", progress=False)
    manifest = write_chakra(programs_2stage(), mesh, tmp_path / "cls", classes_only=True, progress=False)
    cls = tmp_path / "cls"
    assert sorted(p.name for p in cls.glob("*.et")) == ["trace.class0.et", "trace.class1.et"]
    rc = json.loads((cls / "trace.rank_classes.json").read_text())
    assert rc["rank_to_class"] == [r // 8 for r in range(16)]
    assert [c["stamped_as_rank"] for c in rc["classes"]] == [0, 8]
    for c in rc["classes"]:
        assert (cls / c["file"]).read_bytes() == (tmp_path / "full" / f"trace.{c['stamped_as_rank']}.et").read_bytes()
    assert manifest["mode"] == "classes_only" and validate_trace_dir(cls).errors == []


# --- validator catches what ASTRA-sim would choke on ----------------------------------------------

def test_validator_flags_unmatched_p2p_and_missing_deps(tmp_path: Path) -> None:
    mesh = mesh_2x4x2()
    progs = programs_2stage()
    progs[0].nodes[0].tag = 999  # stage 1's recv_act no longer matches stage 0's send_act
    write_chakra(progs, mesh, tmp_path / "bad", progress=False)
    meta, nodes = read_chakra(tmp_path / "bad" / "trace.2.et")
    nodes[1].data_deps.append(42)  # a dependency on an id that does not exist
    nodes[2].ctrl_deps.append(3)  # 2 -> 3 -> 2 (node 3 depends on 2): a cycle
    blobs = [meta.SerializeToString()] + [n.SerializeToString() for n in nodes]
    (tmp_path / "bad" / "trace.2.et").write_bytes(b"".join(varint(len(b)) + b for b in blobs))
    errors = validate_trace_dir(tmp_path / "bad").errors
    assert any("unmatched send/recv" in e for e in errors)
    assert any("missing id 42" in e for e in errors)
    # nodes 2 and 3 wait on each other; 4 (recv_grad), 5 (bwd) and 6 (dp all-reduce) wait behind them
    assert any("trace.2.et: dependency cycle among 5 nodes" in e for e in errors)


def test_validator_flags_wrong_group_and_types(tmp_path: Path) -> None:
    mesh = mesh_2x4x2()
    out = tmp_path / "t"
    write_chakra(programs_2stage(), mesh, out, progress=False)
    meta, nodes = read_chakra(out / "trace.3.et")
    coll = next(n for n in nodes if n.type == schema.COMM_COLL_NODE)
    for a in coll.attr:
        if a.name == "pg_name":
            a.string_val = "1"  # tp group of ranks 0,1: rank 3 is not a member
        if a.name == "comm_size":
            a.double_val = 8.0
    blobs = [meta.SerializeToString()] + [n.SerializeToString() for n in nodes]
    (out / "trace.3.et").write_bytes(b"".join(varint(len(b)) + b for b in blobs))
    errors = validate_trace_dir(out).errors
    assert any("does not contain rank 3" in e for e in errors)
    assert any("comm_size is double_val" in e for e in errors)


# --- atomicity ------------------------------------------------------------------------------------

def test_failure_midway_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = mesh_2x4x2()
    out = tmp_path / "out"
    write_chakra(programs_2stage(), mesh, out, progress=False)
    before = dir_digest(out)
    calls = {"n": 0}
    real = writer_mod._write_file

    def flaky(path: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        real(path, data)

    monkeypatch.setattr(writer_mod, "_write_file", flaky)
    with pytest.raises(OSError, match="injected"):
        write_chakra(programs_2stage(), mesh, out, progress=False, prefix="other")
    assert dir_digest(out) == before  # the previous complete output is untouched
    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(OSError, match="injected"):
        write_chakra(programs_2stage(), mesh, fresh, progress=False)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    shutil.rmtree(out)


def test_class_keys_must_cover_mesh() -> None:
    mesh = mesh_2x4x2()
    with pytest.raises(ValueError, match="cover the mesh"):
        write_chakra([stage_program(0)], mesh, "/nonexistent/never", progress=False)


def test_worker_failure_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same with a process pool: a worker's exception cancels the run and removes the temp dir."""
    real = writer_mod._write_file

    def flaky(path: str, data: bytes) -> None:
        if path.endswith("trace.11.et"):
            raise OSError("disk full (injected in worker)")
        real(path, data)

    monkeypatch.setattr(writer_mod, "_write_file", flaky)  # forked workers inherit the patch
    with pytest.raises(OSError, match="injected in worker"):
        write_chakra(programs_2stage(), mesh_2x4x2(), tmp_path / "o", workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


# --- durations, JSON round trip, classes-only expansion -------------------------------------------

def _durations(node) -> int:  # an arbitrary deterministic rule: 1 us per 1e5 FLOPs, at least 1
    return max(1, node.flops // 100_000)


def test_duration_micros_is_stamped_and_byte_identical(tmp_path: Path) -> None:
    mesh = mesh_2x4x2()
    progs = sorted(programs_2stage(), key=lambda p: p.class_key["pp"])
    comms = Communicators.number(mesh, sorted({k for p in progs for k in p.communicator_kinds()}))
    t = ClassTemplate.build(progs[1], 1, mesh, _durations)
    assert t.stamp(9, mesh, comms) == encode_rank_reference(progs[1], 1, 9, mesh, comms, _durations)
    write_chakra(progs, mesh, tmp_path / "d", progress=False, duration_micros=_durations)
    _, nodes = read_chakra(tmp_path / "d" / "trace.9.et")
    for n, ref in zip(nodes, progs[1].nodes, strict=True):
        expect = FWD_FLOPS // 100_000 if ref.name == "fwd_mlp" else BWD_FLOPS // 100_000
        assert n.duration_micros == (expect if ref.kind == NodeKind.COMP else 0)


def test_program_and_mesh_json_round_trip() -> None:
    from tensorstage.trace.program_json import mesh_from_json, mesh_to_json, program_from_json, program_json

    mesh = mesh_2x4x2()
    for p in programs_2stage():
        p.static_bytes = {"weights": 123}
        p.model_flops = 77
        p.nodes[0].mem_alloc_bytes = 5
        back, durations = program_from_json(json.loads(json.dumps(program_json(p, 0, mesh))))
        assert back == p and durations is None
    assert mesh_from_json(json.loads(json.dumps(mesh_to_json(mesh)))) == mesh


def test_expand_classes_reproduces_full_output(tmp_path: Path) -> None:
    from tensorstage.trace import expand_classes

    mesh = mesh_2x4x2()
    kw = {"progress": False, "inputs": {"model": "toy"}, "duration_micros": _durations}
    write_chakra(programs_2stage(), mesh, tmp_path / "full", **kw)
    write_chakra(programs_2stage(), mesh, tmp_path / "cls", classes_only=True, **kw)
    expand_classes(tmp_path / "cls", tmp_path / "expanded", workers=2, progress=False)
    assert dir_digest(tmp_path / "expanded") == dir_digest(tmp_path / "full")


def test_progress_bar_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chakra(programs_2stage(), mesh_2x4x2(), tmp_path / "p", progress=True)
    out = capsys.readouterr().out
    assert "16/16" in out and "ranks/s" in out and "MB/s" in out
