"""Chakra ET files back into simulator `Program`s: ``tensorstage simulate --trace DIR``.

Two kinds of trace directory are supported:

* **Ours** (a ``manifest.json`` written by :func:`tensorstage.trace.write_chakra`, per-rank or
  classes-only). The mesh and the rank -> class rule come from the manifest, so only one file per
  rank class is decoded (its lowest rank), whatever the world size. Everything the simulator
  needs for *timing* is taken from the ET nodes themselves: ids, dependencies, node type,
  ``num_ops``/``tensor_size``, the GEMM shape ``gemm`` (our own ``int64_list``
  attribute ``[batch, m, n, k]`` on unfused matmul nodes), ``comm_type``/``comm_size``, ``pg_name`` (mapped back to mesh axes
  through the manifest's communicator id ranges), ``comm_src``/``comm_dst`` (mapped to a peer
  axis and offset) and ``comm_tag``. Chakra has no field for a few things the ET cannot carry:
  the op kind of a COMP node (the roofline charges vector ops at the vector peak and attention at
  its own efficiency), its category (fwd / bwd / optimizer), per-node memory allocation and
  release, and which way a wrap-around send goes. Those are taken from the class JSON side files
  (``<prefix>.class<k>.json``, written with ``write_chakra(..., json=True)`` and always in
  classes-only mode), matched by node id and only where that node agrees with the ET node (same
  type, FLOPs/bytes and sizes). ``static_bytes`` and ``model_flops`` come from the manifest's per-class
  totals. Without the side files, op kinds are unknown and every COMP node is charged at the
  matrix-unit rate (documented in :attr:`TraceInput.notes`).
* **Another tool's** (no manifest): ``<prefix>.<rank>.et`` for ranks ``0..N-1`` plus the
  communicator-group JSON (``{"1": [ranks], ...}``) ASTRA-sim takes. A mesh is inferred from the
  groups: every group must be a Cartesian box of strided rank runs, and the strides of all groups
  must nest (each divides the next), as Megatron/torchtitan rank layouts do; otherwise the trace
  is rejected with a ``SpecError``. Every rank file is decoded; ranks whose programs are identical
  (names aside) are then grouped: the smallest set of mesh axes whose coordinates determine a
  rank's program becomes the class key, and one Program per class is simulated (one per rank
  when nothing is shared). COMP nodes with ``duration_micros > 0`` run for that
  duration (ASTRA-sim's default); others by the roofline at the matrix-unit rate. Node ids need
  not be dense or in dependency order: they are renumbered in a topological order that issues
  the lowest original id first. ``is_cpu_op`` nodes and node types ASTRA-sim skips (metadata,
  memory load/store) become zero-cost compute nodes so their dependencies still hold; collectives
  ASTRA-sim does not simulate (broadcast, reduce, ...) are rejected.
"""

from __future__ import annotations

import heapq
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import CollKind, Node, NodeKind, Program
from tensorstage.sim.compute import ComputeModel, Gemm
from tensorstage.trace import schema
from tensorstage.trace.encode import GEMM_ATTR, ROUTE_ATTR, astra_comp_sizes
from tensorstage.trace.program_json import mesh_from_json
from tensorstage.trace.reader import node_attrs, read_chakra
from tensorstage.trace.writer import MANIFEST

#: ``Node.op`` prefix of a COMP node with a fixed duration (from Chakra ``duration_micros``).
FIXED_OP_PREFIX = "duration_us="

_COLL = {int(k): k for k in CollKind}


@dataclass
class TraceInput:
    """Programs rebuilt from a trace directory, the mesh they run on and what was assumed."""

    programs: list[Program]
    mesh: Mesh
    source: str  # "tensorstage" | "chakra"
    inputs: dict[str, Any] = field(default_factory=dict)  # the manifest's recorded inputs (ours)
    annotated: bool = False  # per-node op kinds/memory taken from class JSON side files
    fixed_durations: bool = False  # some COMP nodes carry a fixed duration (FIXED_OP_PREFIX)
    notes: list[str] = field(default_factory=list)


class FixedDurationCompute(ComputeModel):
    """A :class:`ComputeModel` that honours fixed durations encoded in ``Node.op`` (foreign traces)."""

    def time_s(self, flops: float, tensor_bytes: float, op: str = "", gemm: Gemm | None = None,
               category: str = "") -> float:
        if op.startswith(FIXED_OP_PREFIX):
            return int(op[len(FIXED_OP_PREFIX):]) * 1e-6
        return super().time_s(flops, tensor_bytes, op, gemm, category)


def machine_for_trace(machine: Any, trace: TraceInput) -> Any:
    """``machine`` with a compute model that honours the trace's fixed COMP durations, if any."""
    if not trace.fixed_durations:
        return machine
    base = machine.compute
    fixed = FixedDurationCompute(**{f: getattr(base, f) for f in base.__dataclass_fields__})
    return replace(machine, compute=fixed)


def programs_from_trace(directory: str | Path) -> TraceInput:
    """Decode a trace directory (see module docstring) into Programs and a mesh."""
    d = Path(directory)
    if not d.is_dir():
        raise SpecError("trace", f"{d} is not a directory")
    if not (d / MANIFEST).exists() and (d / "traces" / MANIFEST).exists():
        d = d / "traces"  # a `tensorstage run` output directory
    if (d / MANIFEST).exists():
        return _ours(d)
    return _foreign(d)


# --- our traces ---------------------------------------------------------------------------------

def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError("trace", f"cannot read {what} {path.name}: {exc}") from None


def _decode(path: Path) -> list[Any]:
    try:
        _, nodes = read_chakra(path)
    except Exception as exc:  # noqa: BLE001 - missing file, truncated varint, protobuf DecodeError
        raise SpecError("trace", f"cannot decode {path.name}: {exc}") from None
    return nodes


def _ours(d: Path) -> TraceInput:
    manifest = _load_json(d / MANIFEST, "manifest")
    if manifest.get("tool") != "tensorstage":
        raise SpecError("trace", f"{d / MANIFEST} was not written by tensorstage")
    mesh = mesh_from_json(manifest["mesh"])
    prefix = manifest["files"]["prefix"]
    pg_axes: list[tuple[int, int, tuple[str, ...]]] = []
    for key, info in manifest["communicators"].items():
        axes = tuple(key.split(",")) if key else ()
        pg_axes.append((int(info["first_id"]), int(info["first_id"]) + int(info["groups"]), axes))
    rule = manifest["rank_class_rule"]
    key_axes = tuple(rule["key_axes"])
    classes = {int(k): dict(v) for k, v in rule["classes"].items()}
    if manifest["mode"] == "classes_only":
        info = _load_json(d / f"{prefix}.rank_classes.json", "rank classes")
        files = {int(c["class"]): (d / c["file"], int(c["stamped_as_rank"])) for c in info["classes"]}
    else:
        view = mesh.view_of(key_axes) if key_axes else mesh.views["base"]
        files = {}
        for cid, key in classes.items():
            rep = sum(key.get(a.name, 0) * a.stride for a in view)
            files[cid] = (d / f"{prefix}.{rep}.et", rep)
    _check_files(d, manifest, [path for path, _ in files.values()])
    totals = manifest.get("classes", {})
    programs: list[Program] = []
    annotated = True
    for cid in sorted(classes):
        path, rank = files[cid]
        if not path.exists():
            raise SpecError("trace", f"missing trace file {path.name} (class {cid}, rank {rank})")
        nodes = _decode(path)
        side = d / f"{prefix}.class{cid}.json"
        ann = _load_json(side, "class program")["nodes"] if side.exists() else None
        annotated &= ann is not None
        prog = _program_from_nodes(nodes, classes[cid], rank, mesh, pg_axes, ann, path.name)
        tot = totals.get(str(cid), {})
        prog.static_bytes = {k: int(v) for k, v in tot.get("static_bytes", {}).items()}
        prog.model_flops = int(tot.get("model_flops", 0))
        programs.append(prog)
    notes = [] if annotated else [
        "no class JSON side files: COMP op kinds unknown, every COMP node charged at the matrix-unit rate; "
        "no per-node memory (write traces with json=True for exact results)"]
    return TraceInput(programs, mesh, "tensorstage", dict(manifest.get("inputs", {})), annotated, False, notes)


def _check_files(d: Path, manifest: dict[str, Any], class_files: list[Path]) -> None:
    """Every file the manifest lists is there with the recorded total size. Only one file per rank
    class is decoded, so without this a missing or truncated rank file (which ASTRA-sim would
    trip over) would pass unnoticed; a stat per file is cheap even at thousands of ranks."""
    info = manifest["files"]
    if manifest["mode"] == "classes_only":
        paths = class_files
    else:
        paths = [d / f"{info['prefix']}.{rank}.et" for rank in range(int(manifest["world"]))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SpecError("trace", f"missing trace file {missing[0]} ({len(missing)} of {len(paths)} missing)")
    total = sum(p.stat().st_size for p in paths)
    if info.get("bytes") is not None and total != int(info["bytes"]):
        raise SpecError("trace", f"trace files hold {total} bytes, the manifest recorded {info['bytes']}: "
                        "a file is truncated or was changed")


def _axes_of_pg(pg: str, pg_axes: list[tuple[int, int, tuple[str, ...]]], mesh: Mesh, where: str) -> tuple[str, ...]:
    if pg in ("", "0"):
        return tuple(a.name for a in mesh.views["base"] if a.size > 1)
    try:
        gid = int(pg)
    except ValueError:
        raise SpecError("trace", f"{where}: pg_name {pg!r} is not a group id") from None
    for lo, hi, axes in pg_axes:
        if lo <= gid < hi:
            return axes
    raise SpecError("trace", f"{where}: pg_name {pg!r} is not a communicator of the manifest")


def _peer(mesh: Mesh, rank: int, peer: int, where: str) -> tuple[str, int]:
    """Axis and offset (smallest magnitude, positive on a tie) that move ``rank`` to ``peer``."""
    for vname in ("base", *sorted(v for v in mesh.views if v != "base")):
        view = mesh.views[vname]
        diff = [(a, (peer // a.stride) % a.size - (rank // a.stride) % a.size) for a in view]
        moved = [(a, dv) for a, dv in diff if dv]
        if len(moved) == 1:
            a, dv = moved[0]
            alt = dv - a.size if dv > 0 else dv + a.size
            if abs(alt) < abs(dv) or (abs(alt) == abs(dv) and alt > 0):
                dv = alt
            return a.name, dv
    raise SpecError("trace", f"{where}: ranks {rank} and {peer} differ on more than one mesh axis")


def _program_from_nodes(nodes: list[Any], class_key: dict[str, int], rank: int, mesh: Mesh,
                        pg_axes: list[tuple[int, int, tuple[str, ...]]], ann: list[dict[str, Any]] | None,
                        where: str) -> Program:
    prog = Program(class_key=dict(class_key))
    for j, n in enumerate(nodes):
        if n.id != j:
            raise SpecError("trace", f"{where}: node ids are not dense 0..n-1 (node {j} has id {n.id})")
        a = node_attrs(n)
        kind = NodeKind(n.type) if n.type in (4, 5, 6, 7) else None
        if kind is None:
            raise SpecError("trace", f"{where}: node {n.id} has unsupported type {n.type}")
        fields: dict[str, Any] = {"data_deps": tuple(n.data_deps), "ctrl_deps": tuple(n.ctrl_deps)}
        if kind == NodeKind.COMP:
            fields.update(flops=int(a.get("num_ops", 0)), tensor_bytes=int(a.get("tensor_size", 0)),
                          gemm=gemm_of(a))
        elif kind == NodeKind.COLL:
            ct = int(a.get("comm_type", -1))
            if ct not in _COLL:
                raise SpecError("trace", f"{where}: node {n.id} collective type {ct} is not simulated")
            fields.update(comm=_COLL[ct], comm_bytes=int(a.get("comm_size", 0)), category="comm",
                          axes=_axes_of_pg(str(a.get("pg_name", "")), pg_axes, mesh, f"{where} node {n.id}"),
                          route=route_of(a))
        else:
            src, dst = int(a["comm_src"]), int(a["comm_dst"])
            mine, other = (src, dst) if kind == NodeKind.SEND else (dst, src)
            if mine != rank:
                raise SpecError("trace", f"{where}: node {n.id} names rank {mine} as itself, file is rank {rank}")
            axis, off = _peer(mesh, rank, other, f"{where} node {n.id}")
            fields.update(peer_axis=axis, peer_offset=off, tag=int(a.get("comm_tag", 0)),
                          comm_bytes=int(a.get("comm_size", 0)), category="comm")
        if ann is not None and j < len(ann):
            _annotate(fields, kind, ann[j], mesh, rank)
        prog.nodes.append(Node(id=j, name=n.name, kind=kind, **fields))
    return prog


def route_of(attrs: dict[str, Any]) -> tuple[int, int, int] | None:
    """``(top_k, groups, groups per token)`` from a COLL node's ``route`` attribute, else ``None``."""
    values = list(getattr(attrs.get(ROUTE_ATTR), "values", ()))
    if len(values) != 3:
        return None
    k, g, t = (int(x) for x in values)
    return (k, g, t)


def gemm_of(attrs: dict[str, Any]) -> Gemm | None:
    """``(batch, m, n, k)`` from a COMP node's ``gemm`` attribute (an int64 list of four), else ``None``."""
    value = attrs.get(GEMM_ATTR)
    values = list(getattr(value, "values", ()))
    if len(values) != 4:
        return None
    b, m, n, k = (int(x) for x in values)
    return (b, m, n, k)


def _annotate(fields: dict[str, Any], kind: NodeKind, ref: dict[str, Any], mesh: Mesh, rank: int) -> None:
    """Copy what the ET cannot carry from the class JSON node, if it is the same node."""
    if ref.get("kind") != kind.name:
        return
    if kind == NodeKind.COMP:
        # the file holds astra_comp_sizes(...) of the exact values, which the JSON keeps
        if astra_comp_sizes(ref["flops"], ref["tensor_bytes"]) != (fields["flops"], fields["tensor_bytes"]):
            return
        fields["flops"], fields["tensor_bytes"] = int(ref["flops"]), int(ref["tensor_bytes"])
    elif ref["comm_bytes"] != fields["comm_bytes"]:
        return
    if kind in (NodeKind.SEND, NodeKind.RECV):
        ax, off = ref["peer_axis"], int(ref["peer_offset"])
        if ax in mesh.axis_names() and (
                mesh.peer(rank, ax, off) == mesh.peer(rank, fields["peer_axis"], fields["peer_offset"])):
            fields["peer_axis"], fields["peer_offset"] = ax, off
    for k in ("category", "op", "layer", "microbatch", "chunk", "mem_alloc_bytes", "mem_free_bytes",
              "mem_free_comm_bytes"):
        if k in ref:
            fields[k] = ref[k]


# --- another tool's traces -------------------------------------------------------------------------

_RANK_FILE = re.compile(r"^(?P<prefix>.+)\.(?P<rank>\d+)\.et$")


def _foreign(d: Path) -> TraceInput:
    by_prefix: dict[str, dict[int, Path]] = {}
    for p in d.iterdir():
        m = _RANK_FILE.match(p.name)
        if m:
            by_prefix.setdefault(m["prefix"], {})[int(m["rank"])] = p
    if not by_prefix:
        raise SpecError("trace", f"{d} holds no <prefix>.<rank>.et files and no manifest.json")
    if len(by_prefix) > 1:
        raise SpecError("trace", f"{d} mixes trace prefixes {sorted(by_prefix)}")
    prefix, files = next(iter(by_prefix.items()))
    world = len(files)
    if sorted(files) != list(range(world)):
        raise SpecError("trace", f"{d}: rank files must be {prefix}.0.et .. {prefix}.{world - 1}.et")
    groups = _find_groups(d, prefix)
    mesh, group_axes = infer_mesh(world, groups)
    per_rank = []
    fixed = False
    for r in range(world):
        prog, has_fixed = _foreign_program(_decode(files[r]), r, mesh, group_axes, files[r].name)
        fixed |= has_fixed
        prog.model_flops = sum(n.flops for n in prog.nodes)
        per_rank.append(prog)
    programs = group_ranks(per_rank, mesh)
    notes = [f"foreign trace: {world} rank files grouped into {len(programs)} rank class(es) of identical "
             "programs; COMP op kinds unknown (matrix-unit rate or duration_micros); no memory information; "
             "MFU uses the executed FLOPs"]
    return TraceInput(programs, mesh, "chakra", {}, False, fixed, notes)


def _signature(prog: Program) -> tuple:
    """Everything that matters to the simulator in a rank's program (names excluded)."""
    return tuple((n.kind, n.data_deps, n.ctrl_deps, n.flops, n.tensor_bytes, n.op, n.comm, n.comm_bytes, n.axes,
                  n.peer_axis, n.peer_offset, n.tag, n.gemm, n.route) for n in prog.nodes)


def group_ranks(per_rank: list[Program], mesh: Mesh) -> list[Program]:
    """One Program per class of ranks with identical programs: the smallest set of mesh axes whose
    coordinates determine a rank's program becomes the class key (all axes if nothing is shared)."""
    axes = [a.name for a in mesh.views["base"]]
    sig_id: dict[tuple, int] = {}
    sigs = [sig_id.setdefault(_signature(p), len(sig_id)) for p in per_rank]
    coords = [[mesh.coord(r, a) for a in axes] for r in range(len(per_rank))]
    subsets = sorted((tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(1 << len(axes))),
                     key=lambda t: (len(t), [axes.index(a) for a in t]))
    for subset in subsets:
        idx = [axes.index(a) for a in subset]
        seen: dict[tuple[int, ...], int] = {}
        if all(seen.setdefault(tuple(c[i] for i in idx), s) == s for c, s in zip(coords, sigs, strict=True)):
            break
    out: dict[tuple[int, ...], Program] = {}
    for r, prog in enumerate(per_rank):
        k = tuple(coords[r][axes.index(a)] for a in subset)
        if k not in out:
            prog.class_key = dict(zip(subset, k, strict=True))
            out[k] = prog
    return [out[k] for k in sorted(out)]


def _find_groups(d: Path, prefix: str) -> dict[str, list[int]]:
    for name in (f"{prefix}_comm_groups.json", "comm_groups.json", f"{prefix}.comm_groups.json"):
        if (d / name).exists():
            data = _load_json(d / name, "communicator groups")
            break
    else:
        cands = sorted(p for p in d.glob("*.json"))
        data = None
        for p in cands:
            obj = _load_json(p, "json")
            if isinstance(obj, dict) and obj and all(k.isdigit() for k in obj):
                data = obj
                break
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise SpecError("trace", "communicator group JSON must be an object {\"id\": [ranks]}")
    return {str(k): [int(r) for r in v] for k, v in data.items()}


def _factors(ranks: list[int]) -> list[tuple[int, int]] | None:
    """``[(stride, size), ...]`` innermost first if ``ranks`` is a Cartesian box of strided runs."""
    rs = sorted(set(ranks))
    if len(rs) != len(ranks) or not rs:
        return None
    base = rs[0]
    out: list[tuple[int, int]] = []
    block = 1  # members covered so far (product of sizes)
    while block < len(rs):
        stride = rs[block] - base
        size = 1
        while (size + 1) * block <= len(rs) and rs[size * block] - base == size * stride:
            size += 1
        if size == 1:
            return None
        out.append((stride, size))
        block *= size
    expect = [base]
    for s, n in out:
        expect = [e + i * s for i in range(n) for e in expect]
    return out if sorted(expect) == rs else None


def infer_mesh(world: int, groups: dict[str, list[int]]) -> tuple[Mesh, dict[str, tuple[str, ...]]]:
    """A mesh whose axes explain every communicator group, and each group's axes (see module doc)."""
    bounds = {1, world}
    fac: dict[str, list[tuple[int, int]]] = {}
    for gid, ranks in groups.items():
        if any(r < 0 or r >= world for r in ranks):
            raise SpecError("trace", f"communicator group {gid} names ranks outside 0..{world - 1}")
        f = _factors(ranks)
        if f is None:
            raise SpecError("trace", f"communicator group {gid} {ranks[:8]} is not a strided box of ranks; "
                                     "cannot infer a mesh")
        fac[gid] = f
        for s, n in f:
            bounds |= {s, s * n}
    b = sorted(bounds)
    for x, y in zip(b, b[1:], strict=False):
        if y % x:
            raise SpecError("trace", f"communicator groups do not nest (stride {x} does not divide {y}); "
                                     "cannot infer a mesh")
    if b[-1] != world:
        raise SpecError("trace", f"communicator groups span {b[-1]} ranks but the trace has {world}")
    axes = [(f"a{i}", y // x) for i, (x, y) in enumerate(zip(b, b[1:], strict=False))]
    mesh = Mesh.create(axes or [("a0", 1)])
    start = {x: i for i, x in enumerate(b)}
    group_axes = {}
    for gid, f in fac.items():
        names: list[str] = []
        for s, n in f:
            names += [f"a{i}" for i in range(start[s], start[s * n])]
        group_axes[gid] = tuple(names)
    return mesh, group_axes


def _foreign_program(nodes: list[Any], rank: int, mesh: Mesh, group_axes: dict[str, tuple[str, ...]],
                     where: str) -> tuple[Program, bool]:
    """Renumber in topological order (lowest original id first) and convert every node."""
    by_id = {}
    for n in nodes:
        if n.id in by_id:
            raise SpecError("trace", f"{where}: duplicate node id {n.id}")
        by_id[n.id] = n
    indeg: dict[int, int] = {}
    users: dict[int, list[int]] = {}
    for n in nodes:
        deps = set(n.data_deps) | set(n.ctrl_deps)
        for dep in deps:
            if dep not in by_id:
                raise SpecError("trace", f"{where}: node {n.id} depends on missing id {dep}")
            users.setdefault(dep, []).append(n.id)
        indeg[n.id] = len(deps)
    ready = [i for i, k in indeg.items() if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise SpecError("trace", f"{where}: dependency cycle among {len(nodes) - len(order)} nodes")
    new_id = {old: j for j, old in enumerate(order)}
    all_axes = tuple(a.name for a in mesh.views["base"] if a.size > 1)
    prog = Program(class_key={})
    fixed = False
    for j, old in enumerate(order):
        n = by_id[old]
        a = node_attrs(n)
        deps = {"data_deps": tuple(sorted(new_id[x] for x in set(n.data_deps))),
                "ctrl_deps": tuple(sorted(new_id[x] for x in set(n.ctrl_deps) - set(n.data_deps)))}
        t = n.type
        if t == schema.COMM_COLL_NODE and not a.get("is_cpu_op"):
            ct = int(a.get("comm_type", -1))
            if ct not in _COLL:
                raise SpecError("trace", f"{where}: node {old} collective type {ct} is not simulated")
            pg = str(a.get("pg_name", ""))
            axes = all_axes if pg in ("", "0") else group_axes.get(pg)
            if axes is None:
                raise SpecError("trace", f"{where}: node {old} pg_name {pg!r} is not in the group JSON")
            if mesh.size(*axes) <= 1:
                prog.nodes.append(Node(j, n.name, NodeKind.COMP, **deps, category="comm"))
                continue
            prog.nodes.append(Node(j, n.name, NodeKind.COLL, **deps, comm=_COLL[ct],
                                   comm_bytes=int(a.get("comm_size", 0)), axes=axes, category="comm", op="comm"))
        elif t in (schema.COMM_SEND_NODE, schema.COMM_RECV_NODE) and not a.get("is_cpu_op"):
            src, dst = int(a["comm_src"]), int(a["comm_dst"])
            other = dst if t == schema.COMM_SEND_NODE else src
            axis, off = _peer(mesh, rank, other, f"{where} node {old}")
            kind = NodeKind.SEND if t == schema.COMM_SEND_NODE else NodeKind.RECV
            prog.nodes.append(Node(j, n.name, kind, **deps, peer_axis=axis, peer_offset=off,
                                   tag=int(a.get("comm_tag", 0)), comm_bytes=int(a.get("comm_size", 0)),
                                   category="comm", op="comm"))
        elif t == schema.COMP_NODE and not a.get("is_cpu_op"):
            us = int(n.duration_micros)
            op = f"{FIXED_OP_PREFIX}{us}" if us > 0 else "matmul"
            fixed |= us > 0
            prog.nodes.append(Node(j, n.name, NodeKind.COMP, **deps, flops=int(a.get("num_ops", 0)),
                                   tensor_bytes=int(a.get("tensor_size", 0)), op=op, gemm=gemm_of(a)))
        else:  # CPU ops, metadata, memory nodes: no device time, dependencies kept
            prog.nodes.append(Node(j, n.name, NodeKind.COMP, **deps, category="other", op=f"{FIXED_OP_PREFIX}0"))
            fixed = True
    return prog, fixed
