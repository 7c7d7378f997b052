"""Programs and meshes as JSON, losslessly: readable class traces and re-expansion of class files.

A classes-only trace directory ships each class once. To turn it back into the per-rank files
ASTRA-sim needs, the symbolic program (groups as mesh axes, peers as offsets) is required, not
just the class file stamped for one rank; `program_json` writes every `Node` field so that
`program_from_json` rebuilds the identical `Program`, and `expand_classes` rewrites the full
per-rank directory byte for byte as a direct per-rank write would.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import CollKind, Node, NodeKind, Program
from tensorstage.trace.encode import DurationFn, variable_attrs

_NODE_FIELDS = [f.name for f in dataclasses.fields(Node)]


def program_json(program: Program, class_id: int, mesh: Mesh,
                 duration_micros: DurationFn | None = None) -> dict[str, object]:
    """Every field of every node (enums by name), plus group sizes and the per-rank stamped attributes."""
    nodes = []
    for n in program.nodes:
        d: dict[str, object] = {}
        for name in _NODE_FIELDS:
            v = getattr(n, name)
            if name == "kind":
                v = n.kind.name
            elif name == "comm":
                v = None if v is None else CollKind(v).name
            elif isinstance(v, tuple):
                v = list(v)
            d[name] = v
        if n.kind == NodeKind.COLL:
            d["group_size"] = mesh.size(*n.axes)
        if duration_micros is not None and n.kind == NodeKind.COMP:
            d["duration_micros"] = duration_micros(n)
        d["stamped_per_rank"] = [name for name, _ in variable_attrs(n)]
        nodes.append(d)
    return {"class": class_id, "key": dict(program.class_key), "model_flops": program.model_flops,
            "static_bytes": dict(program.static_bytes), "nodes": nodes}


def program_from_json(obj: Mapping[str, object]) -> tuple[Program, dict[int, int] | None]:
    """Inverse of `program_json`: the Program and, if recorded, ``{node id: duration_micros}``."""
    p = Program(class_key=dict(obj["key"]), static_bytes=dict(obj["static_bytes"]),
                model_flops=int(obj["model_flops"]))
    durations: dict[int, int] = {}
    for d in obj["nodes"]:
        kw = {k: d[k] for k in _NODE_FIELDS if k in d or k not in ("gemm", "route")}
        kw["gemm"] = tuple(d["gemm"]) if d.get("gemm") is not None else None
        kw["route"] = tuple(d["route"]) if d.get("route") is not None else None
        kw["kind"] = NodeKind[d["kind"]]
        kw["comm"] = None if d["comm"] is None else CollKind[d["comm"]]
        for k in ("data_deps", "ctrl_deps", "axes"):
            kw[k] = tuple(d[k])
        p.nodes.append(Node(**kw))
        if "duration_micros" in d:
            durations[d["id"]] = int(d["duration_micros"])
    return p, (durations or None)


def mesh_to_json(mesh: Mesh) -> dict[str, list[dict[str, int | str]]]:
    return {v: [{"name": a.name, "size": a.size, "stride": a.stride} for a in axes]
            for v, axes in mesh.views.items()}


def mesh_from_json(views: Mapping[str, list[Mapping[str, object]]]) -> Mesh:
    """Rebuild a Mesh from `mesh_to_json` output (views as re-factored runs of base axes)."""
    base = [(a["name"], int(a["size"])) for a in views["base"]]
    base_names = {n for n, _ in base}
    refactor = {}
    for vname, axes in views.items():
        if vname == "base":
            continue
        names = {a["name"] for a in axes}
        old = [n for n, _ in base if n not in names]
        new = [(a["name"], int(a["size"])) for a in axes if a["name"] not in base_names]
        refactor[vname] = (old, new)
    return Mesh.create(base, refactor=refactor or None)


def expand_classes(class_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], workers: int = 1,
                   progress: bool = True) -> dict[str, object]:
    """Write the full per-rank directory from a classes-only directory (same bytes as a direct write)."""
    from tensorstage.trace.writer import MANIFEST, write_chakra

    d = Path(class_dir)
    manifest = json.loads((d / MANIFEST).read_text())
    if manifest["mode"] != "classes_only":
        raise ValueError(f"{d} is not a classes-only trace directory (mode {manifest['mode']!r})")
    prefix = manifest["files"]["prefix"]
    mesh = mesh_from_json(manifest["mesh"])
    programs, durations = [], {}
    for cid in sorted(manifest["classes"], key=int):
        prog, dur = program_from_json(json.loads((d / f"{prefix}.class{cid}.json").read_text()))
        programs.append(prog)
        if dur:
            durations.update({id(prog.nodes[i]): us for i, us in dur.items()})
    fn = (lambda node: durations[id(node)]) if durations else None
    return write_chakra(programs, mesh, out_dir, prefix=prefix, workers=workers, progress=progress,
                        inputs=manifest["inputs"], duration_micros=fn,
                        durations_info={k: v for k, v in manifest.get("compute_durations", {}).items()
                                        if k != "present"} if fn else None)
