"""Chakra ET message classes, built at import time from the bundled ``et_def.proto``.

Why not a protoc-generated ``et_def_pb2.py``: generated code pins the protobuf *runtime* to the
generator's version range (protobuf >= 5.26 gencode refuses older runtimes, and new runtimes warn
on or reject old gencode), which would force a narrow ``protobuf`` bound on every user. Building
a ``FileDescriptorProto`` from the .proto text uses only stable public APIs (``descriptor_pb2``,
``DescriptorPool``, ``message_factory.GetMessageClass``) that exist in protobuf 4.25 through 7.x,
and keeps the .proto the single source of truth. The parser accepts only the small proto3 subset
the schema file uses and fails loudly on anything else.

Exports the message classes (``Node``, ``GlobalMetadata``, ``AttributeProto``, ``IOInfo`` and the
``*List`` messages) and the enum values as module constants (``COMP_NODE``, ``ALL_REDUCE``, ...).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_PACKAGE = "ChakraProtoMsg"
PROTO_FILE = "et_def.proto"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS: dict[str, int] = {
    "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "sint32": _F.TYPE_SINT32,
    "sint64": _F.TYPE_SINT64, "fixed32": _F.TYPE_FIXED32, "fixed64": _F.TYPE_FIXED64,
    "sfixed32": _F.TYPE_SFIXED32, "sfixed64": _F.TYPE_SFIXED64, "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES,
}  # fmt: skip
_TOKEN = re.compile(r"\s*(?:(//[^\n]*)|([A-Za-z_][A-Za-z0-9_.]*|\d+|\"[^\"]*\"|[{};=]))")


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"{PROTO_FILE}: cannot parse near {text[pos:pos + 40]!r}")
        pos = m.end()
        if m.group(2) is not None:
            out.append(m.group(2))
    return out


def parse_proto(text: str) -> descriptor_pb2.FileDescriptorProto:
    """Parse the proto3 subset used by ``et_def.proto`` into a ``FileDescriptorProto``.

    Mirrors what ``protoc --descriptor_set_out`` produces for the same file (json_name excluded),
    which the tests check when protoc is available.
    """
    toks = _tokens(text)
    fdp = descriptor_pb2.FileDescriptorProto(name=PROTO_FILE, syntax="proto3")
    i = 0

    def expect(tok: str) -> None:
        nonlocal i
        if toks[i] != tok:
            raise ValueError(f"{PROTO_FILE}: expected {tok!r}, got {toks[i]!r}")
        i += 1

    enums: set[str] = set()
    pending: list[tuple[Any, str]] = []  # (field, type name) resolved after all types are known
    while i < len(toks):
        kw = toks[i]
        if kw == "syntax":
            expect("syntax")
            expect("=")
            if toks[i] != '"proto3"':
                raise ValueError(f"{PROTO_FILE}: only proto3 is supported")
            i += 1
            expect(";")
        elif kw == "package":
            i += 1
            fdp.package = toks[i]
            i += 1
            expect(";")
        elif kw == "enum":
            e = fdp.enum_type.add(name=toks[i + 1])
            enums.add(e.name)
            i += 2
            expect("{")
            while toks[i] != "}":
                e.value.add(name=toks[i], number=int(toks[i + 2]))
                i += 3
                expect(";")
            i += 1
        elif kw == "message":
            msg = fdp.message_type.add(name=toks[i + 1])
            i += 2
            expect("{")
            oneof_index: int | None = None
            while True:
                tok = toks[i]
                if tok == "}":
                    i += 1
                    if oneof_index is None:
                        break
                    oneof_index = None
                    continue
                if tok == "oneof":
                    msg.oneof_decl.add(name=toks[i + 1])
                    oneof_index = len(msg.oneof_decl) - 1
                    i += 2
                    expect("{")
                    continue
                label = _F.LABEL_OPTIONAL
                if tok == "repeated":
                    label = _F.LABEL_REPEATED
                    i += 1
                ftype, fname, _eq, fnum = toks[i : i + 4]
                i += 4
                expect(";")
                field = msg.field.add(name=fname, number=int(fnum), label=label)
                field.json_name = _json_name(fname)
                if oneof_index is not None:
                    field.oneof_index = oneof_index
                if ftype in _SCALARS:
                    field.type = _SCALARS[ftype]  # type: ignore[assignment]
                else:
                    pending.append((field, ftype))
        else:
            raise ValueError(f"{PROTO_FILE}: unsupported construct {kw!r}")
    for field, tname in pending:
        field.type = _F.TYPE_ENUM if tname in enums else _F.TYPE_MESSAGE
        field.type_name = f".{fdp.package}.{tname}"
    return fdp


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _load() -> tuple[descriptor_pb2.FileDescriptorProto, dict[str, Any]]:
    text = resources.files("tensorstage.trace").joinpath(PROTO_FILE).read_text(encoding="utf-8")
    fdp = parse_proto(text)
    pool = descriptor_pool.DescriptorPool()  # private pool: never clashes with a user's Chakra pb2
    pool.Add(fdp)
    classes = {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{fdp.package}.{m.name}"))
               for m in fdp.message_type}
    return fdp, classes


FILE_DESCRIPTOR, _CLASSES = _load()
Node = _CLASSES["Node"]
GlobalMetadata = _CLASSES["GlobalMetadata"]
AttributeProto = _CLASSES["AttributeProto"]
IOInfo = _CLASSES["IOInfo"]
BoolList = _CLASSES["BoolList"]

_ENUM_VALUES = {v.name: v.number for e in FILE_DESCRIPTOR.enum_type for v in e.value}
INVALID_NODE = _ENUM_VALUES["INVALID_NODE"]
METADATA_NODE = _ENUM_VALUES["METADATA_NODE"]
COMP_NODE = _ENUM_VALUES["COMP_NODE"]
COMM_SEND_NODE = _ENUM_VALUES["COMM_SEND_NODE"]
COMM_RECV_NODE = _ENUM_VALUES["COMM_RECV_NODE"]
COMM_COLL_NODE = _ENUM_VALUES["COMM_COLL_NODE"]
ALL_REDUCE = _ENUM_VALUES["ALL_REDUCE"]
ALL_GATHER = _ENUM_VALUES["ALL_GATHER"]
ALL_TO_ALL = _ENUM_VALUES["ALL_TO_ALL"]
REDUCE_SCATTER = _ENUM_VALUES["REDUCE_SCATTER"]


def enum_values(enum_name: str) -> dict[str, int]:
    """``{value name: number}`` of one enum of the schema (e.g. ``"CollectiveCommType"``)."""
    for e in FILE_DESCRIPTOR.enum_type:
        if e.name == enum_name:
            return {v.name: v.number for v in e.value}
    raise KeyError(enum_name)
