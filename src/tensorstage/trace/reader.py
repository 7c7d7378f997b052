"""Reading Chakra ET files back, and checking a trace directory the way ASTRA-sim would use it.

`read_chakra` decodes one varint-delimited file into ``(GlobalMetadata, [Node])``.
`validate_trace_dir` checks what makes ASTRA-sim abort or hang: undecodable files, dependencies
on missing ids, cycles, attribute value types (``pg_name`` a string, integers not doubles),
unsupported node/collective types, send/recv pairs that do not match on (src, dst, tag, size),
``pg_name`` values that are not groups of the comm-group JSON or whose group lacks the rank, and
members of one group issuing different collective sequences on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tensorstage.trace import schema
from tensorstage.trace.writer import MANIFEST, comm_groups_file

_INT_KINDS = {"int32_val", "int64_val", "uint32_val", "uint64_val", "sint32_val", "sint64_val",
              "fixed32_val", "fixed64_val", "sfixed32_val", "sfixed64_val"}
_INT_ATTRS = {"num_ops", "tensor_size", "tensor_loc", "comm_type", "comm_priority", "comm_size",
              "comm_src", "comm_dst", "comm_tag"}
_SIMULATED_COLLECTIVES = {schema.ALL_REDUCE, schema.ALL_GATHER, schema.ALL_TO_ALL, schema.REDUCE_SCATTER}
_RUNNABLE = {schema.COMP_NODE, schema.COMM_SEND_NODE, schema.COMM_RECV_NODE, schema.COMM_COLL_NODE}


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_chakra(data: bytes) -> tuple[object, list[object]]:
    """Decode delimited ``GlobalMetadata`` + ``Node`` messages from bytes."""
    pos, msgs = 0, []
    while pos < len(data):
        size, pos = _read_varint(data, pos)
        if pos + size > len(data):
            raise ValueError(f"message at byte {pos} runs past the end of the file")
        msgs.append(data[pos:pos + size])
        pos += size
    if not msgs:
        raise ValueError("empty trace file (no GlobalMetadata)")
    meta = schema.GlobalMetadata()
    meta.ParseFromString(msgs[0])
    nodes = []
    for raw in msgs[1:]:
        n = schema.Node()
        n.ParseFromString(raw)
        nodes.append(n)
    return meta, nodes


def read_chakra(path: str | os.PathLike[str]) -> tuple[object, list[object]]:
    """``(GlobalMetadata, [Node, ...])`` of one ``.et`` file."""
    return decode_chakra(Path(path).read_bytes())


def attr_value(attr: object) -> object:
    """Python value of an ``AttributeProto`` (whatever its oneof holds)."""
    kind = attr.WhichOneof("value")
    return None if kind is None else getattr(attr, kind)


def node_attrs(node: object) -> dict[str, object]:
    """``{attribute name: value}`` of a node."""
    return {a.name: attr_value(a) for a in node.attr}


@dataclass
class ValidationReport:
    """What `validate_trace_dir` saw; ``errors`` empty means the directory passed."""

    ranks: int = 0
    nodes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


_NEEDED = {schema.COMP_NODE: ("num_ops", "tensor_size"),
           schema.COMM_COLL_NODE: ("comm_type", "comm_size", "pg_name"),
           schema.COMM_SEND_NODE: ("comm_src", "comm_dst", "comm_tag", "comm_size"),
           schema.COMM_RECV_NODE: ("comm_src", "comm_dst", "comm_tag", "comm_size")}
_OK_KIND = {**{n: _INT_KINDS for n in _INT_ATTRS}, "pg_name": {"string_val"}, "gemm": {"int64_list"},
            "route": {"int64_list"},
            "is_cpu_op": {"bool_val", *_INT_KINDS}}


def check_nodes(nodes: list[object], where: str, attrs_out: list[dict[str, object]] | None = None) -> list[str]:
    """Per-file structural checks: unique ids, deps exist, acyclic, types as ASTRA-sim expects.

    ``attrs_out``, if given, receives each node's ``{attribute: value}`` (decoded once, reused).
    """
    errors: list[str] = []
    ids = [n.id for n in nodes]
    id_set = set(ids)
    if len(id_set) != len(ids):
        errors.append(f"{where}: duplicate node ids")
    topo = True
    for n in nodes:
        nid = n.id
        for d in (*n.data_deps, *n.ctrl_deps):
            if d not in id_set:
                errors.append(f"{where}: node {nid} depends on missing id {d}")
            elif d >= nid:
                topo = False
        ntype = n.type
        if ntype not in _RUNNABLE:
            errors.append(f"{where}: node {nid} has type {ntype} that ASTRA-sim cannot run")
        attrs = {}
        for a in n.attr:
            kind = a.WhichOneof("value")
            name = a.name
            ok = _OK_KIND.get(name)
            if ok is not None and kind not in ok:
                errors.append(f"{where}: node {nid} {name} is {kind}, not "
                              + ("a string" if name == "pg_name" else "an integer"))
            attrs[name] = None if kind is None else getattr(a, kind)
        if attrs_out is not None:
            attrs_out.append(attrs)
        for name in _NEEDED.get(ntype, ()):
            if name not in attrs:
                errors.append(f"{where}: node {nid} lacks attribute {name}")
        if ntype == schema.COMP_NODE and not n.duration_micros and not (attrs.get("num_ops") or 0) >= 1:
            errors.append(f"{where}: node {nid} has num_ops < 1 and no duration_micros "
                          "(ASTRA-sim's roofline would compute 0/0 and never finish)")
        if ntype == schema.COMM_COLL_NODE and attrs.get("comm_type") not in _SIMULATED_COLLECTIVES:
            errors.append(f"{where}: node {nid} comm_type {attrs.get('comm_type')} is not simulated")
    if not topo:
        errors += _cycle_check(nodes, where)
    return errors


def _cycle_check(nodes: list[object], where: str) -> list[str]:
    indeg = {n.id: 0 for n in nodes}
    users: dict[int, list[int]] = defaultdict(list)
    for n in nodes:
        for d in set((*n.data_deps, *n.ctrl_deps)) & indeg.keys():  # missing ids reported already
            indeg[n.id] += 1
            users[d].append(n.id)
    ready = [i for i, k in indeg.items() if k == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    return [] if seen == len(nodes) else [f"{where}: dependency cycle among {len(nodes) - seen} nodes"]


def validate_trace_dir(directory: str | os.PathLike[str], max_errors: int = 50) -> ValidationReport:
    """Check every file of a directory written by `write_chakra` (per-rank or classes-only)."""
    d = Path(directory)
    manifest = json.loads((d / MANIFEST).read_text())
    prefix = manifest["files"]["prefix"]
    groups_path = d / manifest["files"].get("comm_groups", comm_groups_file(prefix))
    groups = {k: frozenset(v) for k, v in json.loads(groups_path.read_text()).items()}
    report = ValidationReport()
    for key, members in groups.items():
        if not key.isdigit() or int(key) < 1:
            report.errors.append(f"comm groups: key {key!r} is not an integer >= 1")
        if len(members) < 2:
            report.errors.append(f"comm groups: group {key} has {len(members)} rank(s)")
    if manifest["mode"] == "classes_only":
        files = [(c["stamped_as_rank"], d / c["file"])
                 for c in json.loads((d / f"{prefix}.rank_classes.json").read_text())["classes"]]
    else:
        files = [(r, d / f"{prefix}.{r}.et") for r in range(manifest["world"])]
    sends: Counter[tuple[int, int, int, int]] = Counter()
    recvs: Counter[tuple[int, int, int, int]] = Counter()
    coll_seq: dict[str, dict[int, str]] = defaultdict(dict)
    for rank, path in files:
        where = path.name
        try:
            _, nodes = read_chakra(path)
        except Exception as exc:  # noqa: BLE001 - missing file or protobuf DecodeError: a finding
            report.errors.append(f"{where}: cannot decode: {exc}")
            continue
        report.ranks += 1
        report.nodes += len(nodes)
        all_attrs: list[dict[str, object]] = []
        report.errors += check_nodes(nodes, where, all_attrs)
        seq: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for n, a in zip(nodes, all_attrs, strict=True):
            if n.type == schema.COMP_NODE:
                continue
            if n.type == schema.COMM_COLL_NODE:
                pg = a.get("pg_name")
                if pg in ("", "0"):  # Chakra: all ranks
                    if len(files) < 2 and manifest["world"] < 2:
                        report.errors.append(f"{where}: node {n.id} all-ranks collective on a world of 1")
                elif pg not in groups:
                    report.errors.append(f"{where}: node {n.id} pg_name {pg!r} is not a comm group")
                elif rank not in groups[pg]:
                    report.errors.append(f"{where}: node {n.id} pg_name {pg!r} does not contain rank {rank}")
                seq[str(pg)].append((a.get("comm_type"), a.get("comm_size")))
            elif n.type in (schema.COMM_SEND_NODE, schema.COMM_RECV_NODE):
                key4 = (a.get("comm_src"), a.get("comm_dst"), a.get("comm_tag"), a.get("comm_size"))
                mine = key4[0] if n.type == schema.COMM_SEND_NODE else key4[1]
                if mine != rank:
                    report.errors.append(f"{where}: node {n.id} names rank {mine} as itself")
                (sends if n.type == schema.COMM_SEND_NODE else recvs)[key4] += 1
        for pg, s in seq.items():
            coll_seq[pg][rank] = hashlib.sha1(repr(s).encode()).hexdigest()
        if len(report.errors) >= max_errors:
            return report
    if manifest["mode"] != "classes_only":
        for key4 in sorted((sends - recvs) + (recvs - sends))[:max_errors]:
            report.errors.append(f"unmatched send/recv (src, dst, tag, size) = {key4}")
        for pg, by_rank in sorted(coll_seq.items()):
            members = groups.get(pg, frozenset(range(manifest["world"])) if pg in ("", "0") else frozenset())
            if set(by_rank) != members:
                report.errors.append(f"group {pg}: ranks {sorted(members - set(by_rank))[:8]} never use it")
            if len(set(by_rank.values())) > 1:
                report.errors.append(f"group {pg}: members issue different collective sequences")
    return report
