"""Encoding a `Program` as Chakra ET bytes: once per class as a template, then stamped per rank.

A rank's file is ``delimited(GlobalMetadata) + delimited(Node)...``. Everything in a class's
nodes is identical on all its ranks except a few attributes that name concrete ranks: a
collective's ``pg_name`` (its group id) and a send/recv's ``comm_src``/``comm_dst``. Those
attributes are placed *last* in each node (``attr`` = field 10 is the node's highest field, so
protobuf serializes appended attributes last too), which splits every node into constant bytes
followed by variable attribute bytes. Per rank we only compute the few distinct variable values
(one per communicator kind / peer direction), encode them by hand and splice them in with one
C-level ``bytes %`` call; the node's length prefix depends only on the *lengths* of its variable
bytes, so a format string is compiled once per class and length signature and cached.

`encode_rank_reference` builds every rank's protobuf objects naively; tests require the fast
path to be byte-identical to it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from tensorstage import __version__
from tensorstage.parallel.mesh import Communicators, Mesh
from tensorstage.schedule.program import Node, NodeKind, Program
from tensorstage.trace import schema

ET_VERSION = "0.0.4"  # GlobalMetadata.version as Chakra's own tools write it

#: ``int64_list`` attribute ``[batch, m, n, k]`` of a COMP node's GEMM shape (``Node.gemm``). ASTRA-sim
#: ignores attribute names it does not know, so it rides along for our reader (``simulate --trace``).
#: One packed list (17 bytes a node) rather than four int64 attributes (~60): traces stay ~6 % larger,
#: not ~19 %, at 4,096 ranks of Llama-3.1-405B (bench/bench_trace.py --dp 32).
GEMM_ATTR = "gemm"
#: ``int64_list`` attribute ``[top_k, groups, groups per token]`` of an MoE token all-to-all under
#: group-limited routing (``Node.route``); ASTRA-sim ignores it and runs the flat all-to-all.
ROUTE_ATTR = "route"

# Slot sources: ("self",) this rank; ("pg", axes) group id over axes; ("peer", axis, offset).
Source = tuple


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (negative int64 as two's complement)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ATTR_TAG = b"\x52"  # Node.attr: field 10, wire type 2
_NAME_TAG = b"\x0a"  # AttributeProto.name: field 1, wire type 2
_INT64_TAG = b"\x48"  # AttributeProto.int64_val: field 9, varint
_STRING_TAG = b"\xea\x01"  # AttributeProto.string_val: field 29, wire type 2


def attr_int64(name: str, value: int) -> bytes:
    """Encoded ``Node.attr`` entry (tag + length + AttributeProto) with ``int64_val``."""
    nb = name.encode()
    body = _NAME_TAG + varint(len(nb)) + nb + _INT64_TAG + varint(value)
    return _ATTR_TAG + varint(len(body)) + body


def attr_string(name: str, value: str) -> bytes:
    """Encoded ``Node.attr`` entry with ``string_val``."""
    nb, vb = name.encode(), value.encode()
    body = _NAME_TAG + varint(len(nb)) + nb + _STRING_TAG + varint(len(vb)) + vb
    return _ATTR_TAG + varint(len(body)) + body


def variable_attrs(node: Node) -> list[tuple[str, Source]]:
    """The rank-dependent attributes of ``node`` in file order: ``(attribute name, source)``."""
    if node.kind == NodeKind.COLL:
        return [("pg_name", ("pg", tuple(node.axes)))]
    if node.kind == NodeKind.SEND:
        return [("comm_src", ("self",)), ("comm_dst", ("peer", node.peer_axis, node.peer_offset))]
    if node.kind == NodeKind.RECV:
        return [("comm_src", ("peer", node.peer_axis, node.peer_offset)), ("comm_dst", ("self",))]
    return []


DurationFn = Callable[[Node], int]


def astra_comp_sizes(flops: int, tensor_bytes: int) -> tuple[int, int]:
    """``(num_ops, tensor_size)`` of a COMP node as written: each at least 1.

    Why: ASTRA-sim's roofline mode times a node as ``num_ops / min(peak, bw * num_ops / tensor_size)``.
    A memory-only node (an embedding gather: 0 FLOPs, bytes > 0) would give 0/0 = NaN, which ASTRA
    turns into 2^63 ns, so no rank ever finishes; with ``num_ops = 1`` the same formula gives
    ``tensor_size / bw``, exactly the node's memory time. A node with FLOPs but no bytes would be
    skipped (ASTRA drops ``tensor_size = 0`` nodes under roofline); with ``tensor_size = 1`` it costs
    ``num_ops / peak``. The extra FLOP or byte is below any time resolution; our own reader takes
    the exact values back from the class JSON when it has it.
    """
    return max(1, int(flops)), max(1, int(tensor_bytes))


def constant_node(node: Node, duration_micros: DurationFn | None = None) -> object:
    """The protobuf ``Node`` with every rank-independent field and attribute, in file order.

    ``duration_micros`` (optional) gives COMP nodes Chakra's ``duration_micros``, which
    ASTRA-sim uses for compute time when its roofline model is off; without it the field is 0.
    """
    if node.kind not in (NodeKind.COMP, NodeKind.COLL, NodeKind.SEND, NodeKind.RECV):
        raise ValueError(f"node {node.id} {node.name!r}: unsupported kind {node.kind!r}")
    msg = schema.Node(id=node.id, name=node.name, type=int(node.kind),
                      ctrl_deps=list(node.ctrl_deps), data_deps=list(node.data_deps))
    if duration_micros is not None and node.kind == NodeKind.COMP:
        us = duration_micros(node)
        if not isinstance(us, int) or us < 0:
            raise ValueError(f"duration_micros of node {node.id} must be a non-negative int, got {us!r}")
        msg.duration_micros = us
    msg.attr.add(name="is_cpu_op", bool_val=False)
    if node.kind == NodeKind.COMP:
        num_ops, tensor_size = astra_comp_sizes(node.flops, node.tensor_bytes)
        msg.attr.add(name="num_ops", int64_val=num_ops)
        msg.attr.add(name="tensor_size", int64_val=tensor_size)
        if node.gemm is not None:  # our own attribute; ASTRA-sim reads attributes by name only
            msg.attr.add(name=GEMM_ATTR).int64_list.values.extend(int(v) for v in node.gemm)
    elif node.kind == NodeKind.COLL:
        if node.comm is None:
            raise ValueError(f"collective node {node.id} {node.name!r} has no comm kind")
        msg.attr.add(name="comm_type", int64_val=int(node.comm))
        msg.attr.add(name="comm_size", int64_val=int(node.comm_bytes))
        if node.route is not None:
            msg.attr.add(name=ROUTE_ATTR).int64_list.values.extend(int(v) for v in node.route)
    else:
        msg.attr.add(name="comm_tag", int64_val=int(node.tag))
        msg.attr.add(name="comm_size", int64_val=int(node.comm_bytes))
    return msg


def metadata_bytes(class_id: int) -> bytes:
    """Serialized (undelimited) ``GlobalMetadata`` of a class: constant, so no rank in it."""
    md = schema.GlobalMetadata(version=ET_VERSION)
    md.attr.add(name="generator", string_val=f"tensorstage {__version__}")
    md.attr.add(name="rank_class", int64_val=class_id)
    return md.SerializeToString(deterministic=True)


def source_value(src: Source, rank: int, mesh: Mesh, comms: Communicators) -> int | str:
    """The concrete value of a slot source on ``rank``."""
    if src[0] == "self":
        return rank
    if src[0] == "pg":
        return str(comms.pg_id(rank, src[1]))
    return mesh.peer(rank, src[1], src[2])


def encode_rank_reference(program: Program, class_id: int, rank: int, mesh: Mesh,
                          comms: Communicators, duration_micros: DurationFn | None = None) -> bytes:
    """Naive encoding: full protobuf objects per node for this rank (the fast path's oracle)."""
    md = metadata_bytes(class_id)
    out = [varint(len(md)), md]
    for node in program.nodes:
        msg = constant_node(node, duration_micros)
        for name, src in variable_attrs(node):
            value = source_value(src, rank, mesh, comms)
            if isinstance(value, str):
                msg.attr.add(name=name, string_val=value)
            else:
                msg.attr.add(name=name, int64_val=value)
        body = msg.SerializeToString(deterministic=True)
        out += [varint(len(body)), body]
    return b"".join(out)


@dataclass
class ClassTemplate:
    """One class's pre-encoded nodes: constant bytes plus the slots stamped per rank.

    ``segments`` alternates constant bytes and variable nodes: a variable node is
    ``(constant node body, slot indices)``; slot ``i`` is ``(attribute name, source)``.
    Format strings are compiled lazily per length signature (``_formats``).
    """

    class_id: int
    slots: list[tuple[str, Source]]
    segments: list[bytes | tuple[bytes, tuple[int, ...]]]
    _formats: dict[tuple[int, ...], tuple[bytes, Callable]] = field(default_factory=dict, repr=False)

    @staticmethod
    def build(program: Program, class_id: int, mesh: Mesh,
              duration_micros: DurationFn | None = None) -> ClassTemplate:
        """Encode ``program`` once. Rejects broken ids/dependencies and collectives over a single
        rank (a group that does nothing; the lowering must not emit them) before anything is written."""
        slots: list[tuple[str, Source]] = []
        slot_index: dict[tuple[str, Source], int] = {}
        md = metadata_bytes(class_id)
        run: list[bytes] = [varint(len(md)), md]
        segments: list[bytes | tuple[bytes, tuple[int, ...]]] = []
        for index, node in enumerate(program.nodes):
            if node.id != index or any(d >= index or d < 0 for d in (*node.data_deps, *node.ctrl_deps)):
                raise ValueError(f"program {program.class_key}: node {index} {node.name!r} breaks the Program "
                                 "invariant (ids dense 0..n-1, every dependency an earlier id)")
            if node.kind == NodeKind.COLL and mesh.size(*node.axes) <= 1:
                raise ValueError(f"collective node {node.id} {node.name!r} spans a group of size 1 "
                                 f"(axes {list(node.axes)}); the lowering must not emit it")
            if node.kind in (NodeKind.SEND, NodeKind.RECV) and not node.peer_axis:
                raise ValueError(f"send/recv node {node.id} {node.name!r} has no peer_axis")
            body = constant_node(node, duration_micros).SerializeToString(deterministic=True)
            var = variable_attrs(node)
            if not var:
                run += [varint(len(body)), body]
                continue
            idx = []
            for key in var:
                if key not in slot_index:
                    slot_index[key] = len(slots)
                    slots.append(key)
                idx.append(slot_index[key])
            segments.append(b"".join(run))
            run = []
            segments.append((body, tuple(idx)))
        segments.append(b"".join(run))
        return ClassTemplate(class_id, slots, segments)

    def slot_bytes(self, rank: int, mesh: Mesh, comms: Communicators) -> list[bytes]:
        """Encoded attribute entries of every slot on ``rank``."""
        out = []
        for name, src in self.slots:
            value = source_value(src, rank, mesh, comms)
            out.append(attr_string(name, value) if isinstance(value, str) else attr_int64(name, value))
        return out

    def _format(self, lengths: tuple[int, ...]) -> tuple[bytes, Callable]:
        fmt = self._formats.get(lengths)
        if fmt is None:
            parts: list[bytes] = []
            order: list[int] = []
            for seg in self.segments:
                if isinstance(seg, bytes):
                    parts.append(seg.replace(b"%", b"%%"))
                    continue
                body, idx = seg
                size = len(body) + sum(lengths[i] for i in idx)
                parts.append((varint(size) + body).replace(b"%", b"%%"))
                parts.append(b"%b" * len(idx))
                order.extend(idx)
            getter = _getter(order)
            fmt = (b"".join(parts), getter)
            self._formats[lengths] = fmt
        return fmt

    def stamp(self, rank: int, mesh: Mesh, comms: Communicators) -> bytes:
        """The file bytes of ``rank`` (which must belong to this class)."""
        values = self.slot_bytes(rank, mesh, comms)
        fmt, getter = self._format(tuple(len(v) for v in values))
        return fmt % getter(values)


def _getter(order: list[int]) -> Callable[[list[bytes]], tuple[bytes, ...]]:
    if not order:
        return lambda values: ()
    if len(order) == 1:
        i = order[0]
        return lambda values: (values[i],)
    return operator.itemgetter(*order)
