"""`SimResult`: what one simulated step produced, summarized per rank class (plain, JSON-able data).

Time decomposition of each class over the step (``step_time_s`` = the slowest class's finish):

``step_time_s = compute_busy_s + exposed_comm_total_s + bubble_s``

* ``compute_busy_s``: time the compute stream runs a node (by ``Node.category`` and ``Node.op``;
  a fused node's time is split over its parts' ops and categories in proportion to their own times);
  includes the overlap slowdown.
* ``exposed_comm_total_s``: time some communication of the class is in flight while its compute
  stream is idle (the union of communication intervals minus compute intervals). Attributed to
  ``"<type>/<axes>"`` keys (``all_reduce/dp``, ``send/pp``, ``recv/pp``) in proportion to each
  operation's own uncovered time when several overlap one another.
* ``bubble_s``: the rest: the compute stream idle with no communication in flight (waiting for a
  peer, pipeline fill/drain, the end of other classes).

Communication intervals are from the transfer's start (all participants posted) to its end;
the wait for peers before that is ``sync_wait_s`` (part of the bubble or hidden under compute): the
length of the union of those waits, so waits of several communications in flight at once count once
and ``sync_wait_s`` never exceeds the step.

Memory per class: ``static`` categories from ``Program.static_bytes`` (weights, gradients,
optimizer states: resident all step) plus a dynamic timeline: a node's ``mem_alloc_bytes`` becomes
live when it starts and its ``mem_free_bytes`` dies when it ends (frees before allocs at equal
times). Dynamic bytes are put in a category: ``activations`` for COMP nodes and ``comm_buffers``
for communication nodes, except a COMP node's ``mem_free_comm_bytes`` (FSDP gathered parameters
freed by the matmul that used them), which leave ``comm_buffers``; a free larger than what its
category holds takes the rest from the other dynamic categories (so totals stay exact whatever the
labels). The peak is the maximum of static + dynamic; ``memory_at_peak_bytes`` breaks it down at
that instant.
OOM: peak > device HBM capacity.

Throughput: ``mfu = sum_c ranks_c * model_flops_c / (step_time_s * world * peak_flops)`` with the
dense datasheet peak of the compute dtype; ``hfu`` the same with the FLOPs the nodes execute
(recompute included).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from tensorstage.gcpause import paused_gc
from tensorstage.schedule.program import NodeKind
from tensorstage.sim.compute import FUSED_PREFIX, fused_parts
from tensorstage.sim.engine import K_COLL, K_COMP, K_SEND, Execution, comm_label


@dataclass
class ClassResult:
    """One rank class (all its ranks behave alike)."""

    class_key: dict[str, int]
    ranks: int
    nodes: int
    finish_s: float
    compute_busy_s: float
    compute_by_category_s: dict[str, float]
    compute_by_op_s: dict[str, float]
    comm_busy_s: dict[str, float]
    exposed_comm_s: dict[str, float]
    exposed_comm_total_s: float
    sync_wait_s: float
    bubble_s: float
    optimizer_s: float
    executed_flops: int
    model_flops: int
    memory_peak_bytes: int
    memory_peak_time_s: float
    memory_at_peak_bytes: dict[str, int]
    oom: bool
    # each label's own uncovered time before the split is scaled to the union (``exposed_comm_s``
    # = ``exposed_comm_total_s`` x raw / sum(raw)); additive, unlike the split
    exposed_comm_raw_s: dict[str, float] = field(default_factory=dict)


@dataclass
class SimResult:
    """Step-level results plus one :class:`ClassResult` per rank class. ``to_dict()`` is JSON-ready."""

    step_time_s: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    hfu: float
    world: int
    dtype: str
    system: str
    peak_flops_per_device: float
    hbm_capacity_bytes: int
    peak_memory_bytes: int
    oom: bool
    classes: list[ClassResult] = field(default_factory=list)
    collective_algorithms: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FLOPS, _ALLOC, _FREE = attrgetter("flops"), attrgetter("mem_alloc_bytes"), attrgetter("mem_free_bytes")


def _label(node: Any) -> str:
    code = K_COLL if node.kind == NodeKind.COLL else (K_SEND if node.kind == NodeKind.SEND else -1)
    return comm_label(code, node.comm, node.axes, node.peer_axis)


def summarize(ex: Execution, tokens_per_step: int = 0) -> SimResult:
    """Reduce an :class:`Execution` to a :class:`SimResult` (see module docstring for definitions)."""
    with paused_gc():
        return _summarize(ex, tokens_per_step)


def _summarize(ex: Execution, tokens_per_step: int) -> SimResult:
    step = ex.step_time_s
    cap = ex.machine.hbm_capacity_bytes
    classes: list[ClassResult] = []
    algos = Counter(ex.algorithm.values())
    tot_model = tot_exec = 0
    start_all, end_all, kind_all, post_all = ex.start_a, ex.end_a, ex.kind_a, ex.post_a
    label_cache: dict[tuple, str] = {}
    for c, prog in enumerate(ex.programs):
        off, stop = ex.offsets[c], ex.offsets[c + 1]
        nodes = prog.nodes
        st, en, kd = start_all[off:stop], end_all[off:stop], kind_all[off:stop]
        dur = en - st
        comp = kd == K_COMP
        if ex.comp_keys is not None and ex.comm_labels is not None:  # what the engine read off the nodes
            by_cat, by_op, comp_flops = _split_by_keys(*ex.comp_keys[c], dur, ex.machine.compute)
            flops = comp_flops + sum(map(_FLOPS, map(nodes.__getitem__, np.flatnonzero(~comp).tolist())))
            labels = ex.comm_labels[c]
        else:
            by_cat, by_op = _fused_split([n.op or "other" for n in nodes], [n.category for n in nodes], dur,
                                         comp, ex.machine.compute)
            flops = sum([n.flops for n in nodes])
            names = []
            for node in [nodes[j] for j in np.flatnonzero(~comp).tolist()]:
                key = (node.kind, node.comm, node.axes, node.peer_axis)
                lab = label_cache.get(key)
                if lab is None:
                    lab = label_cache[key] = _label(node)
                names.append(lab)
            labels = _encode(names)
        cidx = np.flatnonzero(~comp)
        cs_, ce_ = st[cidx], en[cidx]
        comm_busy = _sum_by(labels, ce_ - cs_, np.ones(len(cidx), dtype=bool))
        wait = union_length(post_all[off + cidx], cs_)
        mem_ev: list[tuple[float, int, int, str]] = []  # time, 0=free/1=alloc, delta, category
        # dynamic memory events (two C-level filters: the loop body runs only for the few nodes that have one)
        alloc = list(filter(_ALLOC, nodes))
        at = [off + n.id for n in alloc]
        for node, t, k in zip(alloc, start_all[at].tolist(), kind_all[at].tolist(), strict=True):
            mem_ev.append((t, 1, node.mem_alloc_bytes, "activations" if k == K_COMP else "comm_buffers"))
        free = list(filter(_FREE, nodes))
        at = [off + n.id for n in free]
        for node, t, k in zip(free, end_all[at].tolist(), kind_all[at].tolist(), strict=True):
            if k == K_COMP:
                comm_part = node.mem_free_comm_bytes
                mem_ev.append((t, 0, -(node.mem_free_bytes - comm_part), "activations"))
                if comm_part:
                    mem_ev.append((t, 0, -comm_part, "comm_buffers"))
            else:
                mem_ev.append((t, 0, -node.mem_free_bytes, "comm_buffers"))
        cs, ce = st[comp], en[comp]
        busy = float(dur[comp].sum())
        exposed, exposed_by, exposed_raw = _exposed(cs, ce, cs_, ce_, labels)
        static = {k: int(v) for k, v in sorted(prog.static_bytes.items())}
        peak, peak_t, at_peak = _memory_peak(mem_ev, static)
        tot_model += ex.ranks[c] * prog.model_flops
        tot_exec += ex.ranks[c] * flops
        classes.append(ClassResult(
            class_key=dict(prog.class_key), ranks=ex.ranks[c], nodes=len(nodes),
            finish_s=float(en.max()) if len(en) else 0.0,
            compute_busy_s=busy, compute_by_category_s=by_cat, compute_by_op_s=by_op,
            comm_busy_s=dict(sorted(comm_busy.items())),
            exposed_comm_s=dict(sorted(exposed_by.items())), exposed_comm_total_s=exposed, sync_wait_s=wait,
            bubble_s=max(0.0, step - busy - exposed), optimizer_s=by_cat.get("optimizer", 0.0),
            executed_flops=flops, model_flops=prog.model_flops, memory_peak_bytes=peak,
            memory_peak_time_s=peak_t, memory_at_peak_bytes=at_peak, oom=peak > cap,
            exposed_comm_raw_s=dict(sorted(exposed_raw.items())),
        ))
    peak_flops = ex.machine.compute.peak_flops
    denom = step * ex.world * peak_flops
    peak_mem = max(cr.memory_peak_bytes for cr in classes)
    return SimResult(
        step_time_s=step, tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / step if step > 0 else 0.0,
        mfu=tot_model / denom if denom > 0 else 0.0, hfu=tot_exec / denom if denom > 0 else 0.0,
        world=ex.world, dtype=ex.machine.dtype, system=ex.machine.name, peak_flops_per_device=peak_flops,
        hbm_capacity_bytes=cap, peak_memory_bytes=peak_mem, oom=peak_mem > cap, classes=classes,
        collective_algorithms=dict(sorted(algos.items())),
    )


def _encode(labels: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Integer code of every label (first-seen order) and the code table."""
    codes = {k: i for i, k in enumerate(dict.fromkeys(labels))}
    return np.fromiter([codes[x] for x in labels], dtype=np.int64, count=len(labels)), codes


def _sum_by(labels: list[str] | tuple[np.ndarray, dict[str, int]], values: np.ndarray, mask: np.ndarray
            ) -> dict[str, float]:
    """Sum ``values[mask]`` grouped by ``labels`` (sorted keys; only labels present under the mask).

    ``labels`` may be given already encoded by :func:`_encode`.
    """
    idx, codes = labels if isinstance(labels, tuple) else _encode(labels)
    sums = np.bincount(idx[mask], weights=values[mask], minlength=len(codes))
    present = np.bincount(idx[mask], minlength=len(codes)) > 0
    return {k: float(sums[i]) for k, i in sorted(codes.items()) if present[i]}


def _fused_split(labels: list[str], cats: list[str], dur: np.ndarray, comp: np.ndarray, model: Any
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Compute time by category and by op; a fused node's time goes to its parts' categories and
    ops in proportion to the parts' own times."""
    enc = _encode(labels)
    idx, codes = enc
    cenc = _encode(cats)
    fused_codes = [i for lab, i in codes.items() if lab.startswith(FUSED_PREFIX)]
    if not fused_codes:
        return _sum_by(cenc, dur, comp), _sum_by(enc, dur, comp)
    fused = np.isin(idx, fused_codes)
    plain = comp & ~fused
    by_cat = _sum_by(cenc, dur, plain)
    by_op = _sum_by(enc, dur, plain)
    for label, t in _sum_by(enc, dur, comp & fused).items():
        _spread_fused(fused_parts(label) or [], t, model, by_op, by_cat)
    return dict(sorted(by_cat.items())), dict(sorted(by_op.items()))


def _spread_fused(parts: list[tuple], t: float, model: Any, by_op: dict[str, float], by_cat: dict[str, float]
                  ) -> None:
    """Add a fused node's time ``t`` to its parts' ops and categories in proportion to the parts'
    own times (equal shares when they all take no time)."""
    times = [model.time_s(f, b, name, g, cat) for name, f, b, cat, g in parts]
    tot = sum(times)
    for (name, _, _, cat, _), ti in zip(parts, times, strict=True):
        share = t * (ti / tot if tot > 0 else 1.0 / len(parts))
        by_op[name or "other"] = by_op.get(name or "other", 0.0) + share
        by_cat[cat] = by_cat.get(cat, 0.0) + share


def _split_by_keys(sel: np.ndarray, ids: np.ndarray, keys: list[tuple], dur: np.ndarray, model: Any
                   ) -> tuple[dict[str, float], dict[str, float], int]:
    """:func:`_fused_split` from the engine's per-class COMP keys (``Execution.comp_keys``): time by
    category and by op, and the executed FLOPs of the COMP nodes, without reading the nodes again."""
    t = np.bincount(ids, weights=dur[sel], minlength=len(keys))
    n = np.bincount(ids, minlength=len(keys))
    by_cat: dict[str, float] = {}
    by_op: dict[str, float] = {}
    flops = 0
    for i, (fl, _, op, _, cat) in enumerate(keys):
        if not n[i]:
            continue
        flops += int(fl) * int(n[i])
        label, ti = op or "other", float(t[i])
        if label.startswith(FUSED_PREFIX):
            _spread_fused(fused_parts(label) or [], ti, model, by_op, by_cat)
        else:
            by_op[label] = by_op.get(label, 0.0) + ti
            by_cat[cat] = by_cat.get(cat, 0.0) + ti
    return dict(sorted(by_cat.items())), dict(sorted(by_op.items())), flops


def _exposed(cs: np.ndarray, ce: np.ndarray, s: np.ndarray, e: np.ndarray,
             labels: tuple[np.ndarray, dict[str, int]]) -> tuple[float, dict[str, float], dict[str, float]]:
    """Communication time not covered by compute (compute intervals ``cs..ce``, communication
    intervals ``s..e`` with ``labels``, encoded by :func:`_encode`): total over the union, and per label."""
    if not len(s):
        return 0.0, {}, {}
    order = np.argsort(cs, kind="stable")
    cs, ce = cs[order], ce[order]
    pre = np.concatenate(([0.0], np.cumsum(ce - cs)))

    def covered(x: np.ndarray) -> np.ndarray:  # compute busy time in [0, x], elementwise
        i = np.searchsorted(cs, x, side="right") - 1
        ok = i >= 0
        ic = np.where(ok, i, 0)
        val = pre[ic] + np.minimum(x, ce[ic]) - cs[ic] if len(cs) else np.zeros_like(x)
        return np.where(ok, val, 0.0)

    unc = (e - s) - (covered(e) - covered(s))
    raw = _sum_by(labels, unc, unc > 0)
    # union of the communication intervals
    o = np.argsort(s, kind="stable")
    s, e = s[o], e[o]
    run_end = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > run_end[:-1]
    starts = s[new]
    last = np.flatnonzero(np.r_[new[1:], True])
    ends = run_end[last]
    total = float(((ends - starts) - (covered(ends) - covered(starts))).sum())
    total = max(0.0, total)
    return total, split_exposed(total, raw), raw


def union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    """Length of the union of the intervals ``[starts[i], ends[i])`` (empty ones ignored): waits of
    several communications that overlap in time count once."""
    keep = ends > starts
    s, e = starts[keep], ends[keep]
    if not len(s):
        return 0.0
    o = np.argsort(s, kind="stable")
    s, e = s[o], e[o]
    run_end = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > run_end[:-1]
    last = np.flatnonzero(np.r_[new[1:], True])
    return float((run_end[last] - s[new]).sum())


def split_exposed(total: float, raw: dict[str, float]) -> dict[str, float]:
    """``total`` exposed time split over labels in proportion to their own uncovered ``raw`` times."""
    rsum = sum(raw.values())
    scale = total / rsum if rsum > 0 else 0.0
    return {k: v * scale for k, v in raw.items()}


def _memory_peak(events: list[tuple[float, int, int, str]], static: dict[str, int]
                 ) -> tuple[int, float, dict[str, int]]:
    """Peak of static + dynamic memory, when it happens, and the breakdown at that instant."""
    base = sum(static.values())
    cur: dict[str, int] = {"activations": 0, "comm_buffers": 0}
    tot, best, best_t, best_cur = 0, 0, 0.0, dict(cur)
    for t, _, delta, cat in sorted(events):
        tot += delta
        have = cur.get(cat, 0) + delta
        if have < 0:  # free more than the category holds: take the rest from the others
            cur[cat] = 0
            for other in sorted(cur):
                if have >= 0:
                    break
                take = min(cur[other], -have)
                cur[other] -= take
                have += take
        else:
            cur[cat] = have
        if tot > best:
            best, best_t, best_cur = tot, t, dict(cur)
    at_peak = dict(static)
    for k in sorted(best_cur):
        at_peak[k] = at_peak.get(k, 0) + best_cur[k]
    return base + best, best_t, at_peak


def memory_series(ex: Execution, class_index: int) -> list[tuple[float, int]]:
    """Total memory (static + dynamic, bytes) of one class after every change, in time order."""
    prog = ex.programs[class_index]
    off = ex.offsets[class_index]
    ev: list[tuple[float, int, int]] = []
    for node in prog.nodes:
        g = off + node.id
        if node.mem_alloc_bytes:
            ev.append((ex.start[g], 1, node.mem_alloc_bytes))
        if node.mem_free_bytes:
            ev.append((ex.end[g], 0, -node.mem_free_bytes))
    cur = sum(prog.static_bytes.values())
    out = [(0.0, cur)]
    for t, _, d in sorted(ev):
        cur += d
        if out[-1][0] == t:
            out[-1] = (t, cur)
        else:
            out.append((t, cur))
    return out
