"""`write_chakra`: per-rank Chakra ET files (or one per class), comm groups and manifest.

Output directory layout (``prefix`` defaults to ``"trace"``):

* ``<prefix>.<rank>.et`` for ranks ``0..world-1`` (full mode), or ``<prefix>.class<k>.et`` for
  each class ``k`` stamped as its lowest rank plus ``<prefix>.rank_classes.json`` (classes-only).
* ``<prefix>_comm_groups.json``: ``{"1": [ranks], ...}`` for every communicator the programs use.
* ``manifest.json``: inputs, tool version, rank -> class rule, per-class totals, file counts.
* ``<prefix>.class<k>.json`` (with ``json=True``, and always in classes-only mode): each class's
  program, every node field, groups as mesh axes and peers as offsets; `expand_classes` turns a
  classes-only directory back into the per-rank one.

Speed: each class is encoded once (`ClassTemplate`); per rank only group ids and peers are
computed and spliced in. Ranks are split into contiguous ranges over a process pool; workers
receive the templates once (pool initializer) and return only counts, so memory does not grow
with the number of ranks. Every file depends only on its rank, so output is byte-identical for
any worker count. Everything is written into a temporary sibling directory and renamed at the end.
"""

from __future__ import annotations

import json as jsonlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from tensorstage import __version__
from tensorstage.errors import SpecError
from tensorstage.fileio import atomic_dir
from tensorstage.interrupts import check_interrupted, defer_interrupts, ignore_interrupts
from tensorstage.parallel.mesh import Communicators, Mesh
from tensorstage.schedule.program import CollKind, NodeKind, Program
from tensorstage.trace.classes import RankClasses
from tensorstage.trace.encode import ET_VERSION, ClassTemplate, DurationFn
from tensorstage.trace.program_json import mesh_to_json, program_json

MANIFEST = "manifest.json"


def rank_file(prefix: str, rank: int) -> str:
    return f"{prefix}.{rank}.et"


def class_file(prefix: str, class_id: int) -> str:
    return f"{prefix}.class{class_id}.et"


def comm_groups_file(prefix: str) -> str:
    return f"{prefix}_comm_groups.json"


def write_chakra(
    programs: Sequence[Program],
    mesh: Mesh,
    out_dir: str | os.PathLike[str],
    prefix: str = "trace",
    workers: int = 1,
    classes_only: bool = False,
    json: bool = False,
    progress: bool = True,
    inputs: Mapping[str, object] | None = None,
    duration_micros: DurationFn | None = None,
    force: bool = False,
    on_estimate: Callable[[int, int, int], None] | None = None,
    durations_info: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Write Chakra ET traces for every rank of ``mesh`` into ``out_dir`` atomically.

    ``programs`` hold one Program per rank class (``class_key`` coordinates); ``inputs`` is
    recorded verbatim in the manifest (what the caller generated from). ``duration_micros`` maps a
    COMP node to Chakra's ``duration_micros`` (int) for ASTRA-sim runs without roofline (e.g. from
    the simulator's compute model); left out, the field is 0. The manifest's ``compute_durations``
    says which: ``durations_info`` (where the durations came from) plus ``present``. Returns the manifest.
    An existing ``out_dir`` is replaced only once the new output is complete.

    Before writing, the output size is estimated (:func:`estimate_bytes`) and handed to
    ``on_estimate(files, bytes, free_bytes)``; an output that will not fit the free space of the
    target file system is refused (:class:`SpecError` naming ``out``) unless ``force``.
    """
    if "/" in prefix or not prefix:
        raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
    classes = RankClasses.build(programs, mesh)
    kinds = sorted({axes for p in classes.programs for axes in p.communicator_kinds()})
    comms = Communicators.number(mesh, kinds)
    templates = [ClassTemplate.build(p, i, mesh, duration_micros) for i, p in enumerate(classes.programs)]
    n_files, n_bytes = estimate_bytes(templates, classes, comms, len(kinds), classes_only)
    class_docs = [program_json(p, i, mesh, duration_micros) for i, p in enumerate(classes.programs)] \
        if json or classes_only else []
    n_bytes += sum(len(jsonlib.dumps(d, indent=1, sort_keys=True)) + 1 for d in class_docs)
    free = free_bytes(Path(out_dir))
    if on_estimate is not None:
        on_estimate(n_files, n_bytes, free)
    if n_bytes > free and not force:
        raise SpecError("out", f"the traces need about {n_bytes / 1e9:,.1f} GB ({n_files:,} files) but the file "
                        f"system of {out_dir} has {free / 1e9:,.1f} GB free; give --force to try anyway")

    with atomic_dir(out_dir) as tmp:
        _write_comm_groups(tmp / comm_groups_file(prefix), comms)
        if classes_only:
            n_files, n_bytes = _write_classes(tmp, prefix, classes, templates, comms)
        else:
            n_files, n_bytes = _write_all_ranks(tmp, prefix, classes, templates, comms, workers, progress)
        for i, doc in enumerate(class_docs):  # classes-only output needs the symbolic programs to re-expand
            _write_json(tmp / f"{prefix}.class{i}.json", doc)
        manifest = _manifest(classes, comms, prefix, classes_only, inputs or {}, n_files, n_bytes)
        manifest["compute_durations"] = _durations_entry(duration_micros is not None, durations_info)
        _write_json(tmp / MANIFEST, manifest)
    return manifest


def estimate_bytes(templates: Sequence[ClassTemplate], classes: RankClasses, comms: Communicators,
                   n_kinds: int, classes_only: bool) -> tuple[int, int]:
    """(files, bytes) the output will take: each class stamped once for its representative rank
    (ranks of a class differ only in a few varint ids) times its ranks, plus the communicator
    groups file (about 9 bytes per rank per communicator kind)."""
    mesh = classes.mesh
    per_class = [len(t.stamp(classes.representative(i), mesh, comms)) for i, t in enumerate(templates)]
    ranks = 1 if classes_only else classes.ranks_per_class()
    files = len(templates) if classes_only else mesh.world
    return files, sum(per_class) * ranks + 9 * mesh.world * max(1, n_kinds)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe if probe.is_dir() else probe.parent).free
    except OSError:
        return 2**63 - 1  # unknown: let the write itself report the problem


# --- per-rank writing ---------------------------------------------------------------------------

_STATE: dict[str, object] = {}


def _init_worker(templates: list[ClassTemplate], classes: RankClasses, comms: Communicators,
                 directory: str, prefix: str) -> None:
    if mp.parent_process() is not None:  # a pool worker, not the in-process path
        ignore_interrupts()
    _STATE.update(templates=templates, classes=classes, comms=comms, directory=directory, prefix=prefix)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _write_range(start: int, stop: int) -> tuple[int, int]:
    """Write ranks ``start..stop-1``; returns (files, bytes). Runs in a worker or in-process."""
    templates: list[ClassTemplate] = _STATE["templates"]  # type: ignore[assignment]
    classes: RankClasses = _STATE["classes"]  # type: ignore[assignment]
    comms: Communicators = _STATE["comms"]  # type: ignore[assignment]
    directory: str = _STATE["directory"]  # type: ignore[assignment]
    prefix: str = _STATE["prefix"]  # type: ignore[assignment]
    mesh = classes.mesh
    total = 0
    for rank in range(start, stop):
        data = templates[classes.class_of(rank)].stamp(rank, mesh, comms)
        _write_file(os.path.join(directory, rank_file(prefix, rank)), data)
        total += len(data)
    return stop - start, total


def _ranges(world: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, world, chunk):
        yield start, min(world, start + chunk)


def _write_all_ranks(directory: Path, prefix: str, classes: RankClasses, templates: list[ClassTemplate],
                     comms: Communicators, workers: int, show: bool) -> tuple[int, int]:
    world = classes.mesh.world
    workers = max(1, min(int(workers), world))
    # small chunks: a Ctrl-C waits only for the chunks being written (64 files each) before cleanup
    chunk = max(1, min(64, world // (workers * 16) or 1))
    args = (templates, classes, comms, str(directory), prefix)
    n_files = n_bytes = 0
    with _Progress(world, show) as bar:
        if workers == 1:
            _init_worker(*args)
            try:
                for start, stop in _ranges(world, chunk):
                    f, b = _write_range(start, stop)
                    n_files, n_bytes = n_files + f, n_bytes + b
                    bar.advance(f, b)
            finally:
                _STATE.clear()
        else:
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=args) as pool, \
                    defer_interrupts():
                pending = {pool.submit(_write_range, s, e) for s, e in _ranges(world, chunk)}
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                        for fut in done:
                            f, b = fut.result()
                            n_files, n_bytes = n_files + f, n_bytes + b
                            bar.advance(f, b)
                        check_interrupted()
                except BaseException:  # Ctrl-C, a failed write: stop the queued work at once
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return n_files, n_bytes


def _write_classes(directory: Path, prefix: str, classes: RankClasses, templates: list[ClassTemplate],
                   comms: Communicators) -> tuple[int, int]:
    """Classes-only mode: each class stamped as its lowest rank, plus the full rank -> class map."""
    mesh = classes.mesh
    n_bytes = 0
    info = []
    for i, t in enumerate(templates):
        rep = classes.representative(i)
        data = t.stamp(rep, mesh, comms)
        _write_file(str(directory / class_file(prefix, i)), data)
        n_bytes += len(data)
        info.append({"class": i, "key": dict(classes.programs[i].class_key), "file": class_file(prefix, i),
                     "stamped_as_rank": rep, "ranks": classes.ranks_per_class()})
    path = directory / f"{prefix}.rank_classes.json"
    with open(path, "w", encoding="utf-8") as f:
        head = {"world": mesh.world, "rule": classes.rule(), "classes": info}
        f.write(jsonlib.dumps(head, indent=1, sort_keys=True)[:-2])
        f.write(',\n "rank_to_class": [')
        step = 4096
        for start in range(0, mesh.world, step):
            ids = (classes.class_of(r) for r in range(start, min(mesh.world, start + step)))
            f.write(("" if start == 0 else ", ") + ", ".join(map(str, ids)))
        f.write("]\n}\n")
    return len(templates), n_bytes


# --- side files -----------------------------------------------------------------------------------

def _write_comm_groups(path: Path, comms: Communicators) -> None:
    """Stream ``{"id": [ranks]}`` one group per line (never the whole map in memory)."""
    mesh = comms.mesh
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        first = True
        for axes, base in sorted(comms.base.items(), key=lambda kv: kv[1]):
            for i in range(mesh.group_count(axes)):
                ranks = mesh.group_ranks(axes, i)
                f.write(("\n" if first else ",\n") + f'"{base + i}": [{", ".join(map(str, ranks))}]')
                first = False
        f.write("\n}\n")


def _write_json(path: Path, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        jsonlib.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def class_totals(program: Program, mesh: Mesh) -> dict[str, object]:
    """Per-rank totals of one class: FLOPs, bytes, collective bytes by type and axes, p2p bytes."""
    coll: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    coll_count: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    send = recv = flops = tensor = 0
    for n in program.nodes:
        counts[n.kind.name] += 1
        if n.kind == NodeKind.COMP:
            flops += n.flops
            tensor += n.tensor_bytes
        elif n.kind == NodeKind.COLL:
            coll[CollKind(n.comm).name][",".join(n.axes)] += n.comm_bytes
            coll_count[CollKind(n.comm).name] += 1
        elif n.kind == NodeKind.SEND:
            send += n.comm_bytes
        elif n.kind == NodeKind.RECV:
            recv += n.comm_bytes
    return {
        "key": dict(program.class_key),
        "flops": flops,
        "model_flops": program.model_flops,
        "tensor_bytes": tensor,
        "collective_bytes": {k: dict(v) for k, v in sorted(coll.items())},
        "collective_counts": dict(sorted(coll_count.items())),
        "send_bytes": send,
        "recv_bytes": recv,
        "node_counts": dict(sorted(counts.items())),
        "nodes": len(program.nodes),
        "static_bytes": dict(program.static_bytes),
    }


def _manifest(classes: RankClasses, comms: Communicators, prefix: str, classes_only: bool,
              inputs: Mapping[str, object], n_files: int, n_bytes: int) -> dict[str, object]:
    mesh = classes.mesh
    return {
        "tool": "tensorstage",
        "version": __version__,
        "format": {"schema": "Chakra ET, proto3 package ChakraProtoMsg (tensorstage/trace/et_def.proto)",
                   "global_metadata_version": ET_VERSION, "encoding": "varint-delimited messages"},
        "inputs": dict(inputs),
        "world": mesh.world,
        "mesh": mesh_to_json(mesh),
        "mode": "classes_only" if classes_only else "per_rank",
        "files": {"prefix": prefix, "pattern": f"{prefix}.class{{class}}.et" if classes_only else f"{prefix}.{{rank}}.et", "count": n_files, "bytes": n_bytes,
                  "comm_groups": comm_groups_file(prefix),
                  "rank_classes": f"{prefix}.rank_classes.json" if classes_only else None},
        "communicators": {",".join(axes): {"first_id": base, "groups": mesh.group_count(axes),
                                           "size": mesh.size(*axes)} for axes, base in comms.base.items()},
        "rank_class_rule": classes.rule(),
        "ranks_per_class": classes.ranks_per_class(),
        "classes": {str(i): class_totals(p, mesh) for i, p in enumerate(classes.programs)},
    }


def _durations_entry(present: bool, info: Mapping[str, object] | None) -> dict[str, object]:
    """The manifest's word on ``duration_micros``: ASTRA-sim's replay mode needs it (absent = 1 ns a node)."""
    if present:
        return {"present": True, **dict(info or {})}
    return {"present": False,
            "note": "COMP nodes carry no duration_micros: ASTRA-sim with roofline off would charge each "
                    "1 ns; write them with `generate --system SYSTEM`, or run ASTRA-sim with its roofline "
                    "(system_roofline.json of `tensorstage astra-config`)"}


# --- progress -------------------------------------------------------------------------------------

class _Progress:
    """Rich progress bar with ranks/s, MB/s and ETA (no-op when disabled)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show = total, show
        self.bytes = 0
        self._bar = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("writing traces"), BarColumn(), MofNCompleteColumn(), TextColumn("ranks"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("write", total=self.total, rate="")
        return self

    def advance(self, files: int, nbytes: int) -> None:
        self.bytes += nbytes
        if self._bar is not None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            done = self._bar.tasks[0].completed + files
            rate = f"{done / dt:,.0f} ranks/s  {self.bytes / dt / 1e6:,.1f} MB/s"
            self._bar.update(self._task, advance=files, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
