"""`SimResult`: what one simulated step produced, summarized per rank class (plain, JSON-able data).

Time decomposition of each class over the step (``step_time_s`` = the slowest class's finish):

``step_time_s = compute_busy_s + exposed_comm_total_s + bubble_s``

* ``compute_busy_s``: time the compute stream runs a node (by ``Node.category`` and ``Node.op``);
  includes the overlap slowdown.
* ``exposed_comm_total_s``: time some communication of the class is in flight while its compute
  stream is idle (the union of communication intervals minus compute intervals). Attributed to
  ``"<type>/<axes>"`` keys (``all_reduce/dp``, ``send/pp``, ``recv/pp``) in proportion to each
  operation's own uncovered time when several overlap one another.
* ``bubble_s``: the rest: the compute stream idle with no communication in flight (waiting for a
  peer, pipeline fill/drain, the end of other classes).

Communication intervals are from the transfer's start (all participants posted) to its end;
the wait for peers before that is ``sync_wait_s`` (part of the bubble or hidden under compute).

Memory per class: ``static`` categories from ``Program.static_bytes`` (weights, gradients,
optimizer states: resident all step) plus a dynamic timeline: a node's ``mem_alloc_bytes`` becomes
live when it starts and its ``mem_free_bytes`` dies when it ends (frees before allocs at equal
times). Dynamic bytes are put in a category: the node's ``mem_category`` attribute when the IR
has one, else ``activations`` for COMP nodes and ``comm_buffers`` for communication nodes; a free
larger than what its category holds takes the rest from the other dynamic categories (so totals
stay exact even when, e.g., a gathered parameter is freed by the matmul that used it). The peak is
the maximum of static + dynamic; ``memory_at_peak_bytes`` breaks it down at that instant.
OOM: peak > device HBM capacity.

Throughput: ``mfu = sum_c ranks_c * model_flops_c / (step_time_s * world * peak_flops)`` with the
dense datasheet peak of the compute dtype; ``hfu`` the same with the FLOPs the nodes execute
(recompute included).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from typing import Any

from tensorstage.schedule.program import NodeKind
from tensorstage.sim.engine import K_COLL, K_COMP, Execution


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


def _label(node: Any) -> str:
    if node.kind == NodeKind.COLL:
        kind = node.comm.name.lower() if node.comm is not None else "coll"
        return f"{kind}/{','.join(node.axes)}"
    return f"{'send' if node.kind == NodeKind.SEND else 'recv'}/{node.peer_axis}"


def summarize(ex: Execution, tokens_per_step: int = 0) -> SimResult:
    """Reduce an :class:`Execution` to a :class:`SimResult` (see module docstring for definitions)."""
    step = ex.step_time_s
    cap = ex.machine.hbm_capacity_bytes
    classes: list[ClassResult] = []
    algos: dict[str, int] = {}
    tot_model = tot_exec = 0
    start, end, post = ex.start, ex.end, ex.post
    for c, prog in enumerate(ex.programs):
        off = ex.offsets[c]
        by_cat: dict[str, float] = {}
        by_op: dict[str, float] = {}
        comm_busy: dict[str, float] = {}
        cstart: list[float] = []
        cend: list[float] = []
        comm_iv: list[tuple[float, float, str]] = []
        mem_ev: list[tuple[float, int, int, str]] = []  # time, 0=free/1=alloc, delta, category
        flops = 0
        wait = 0.0
        finish = 0.0
        for node in prog.nodes:
            g = off + node.id
            s, e = start[g], end[g]
            if e > finish:
                finish = e
            if ex.kind[g] == K_COMP:
                d = e - s
                by_cat[node.category] = by_cat.get(node.category, 0.0) + d
                op = node.op or "other"
                by_op[op] = by_op.get(op, 0.0) + d
                cstart.append(s)
                cend.append(e)
                flops += node.flops
                mcat = "activations"
            else:
                lab = _label(node)
                comm_busy[lab] = comm_busy.get(lab, 0.0) + (e - s)
                comm_iv.append((s, e, lab))
                wait += s - post[g]
                if ex.kind[g] == K_COLL:
                    a = ex.algorithm.get(g, "")
                    algos[a] = algos.get(a, 0) + 1
                mcat = "comm_buffers"
            if node.mem_alloc_bytes or node.mem_free_bytes:
                mcat = getattr(node, "mem_category", None) or mcat
                if node.mem_alloc_bytes:
                    mem_ev.append((s, 1, node.mem_alloc_bytes, mcat))
                if node.mem_free_bytes:
                    mem_ev.append((e, 0, -node.mem_free_bytes, mcat))
        busy = sum(e - s for s, e in zip(cstart, cend, strict=True))
        exposed, exposed_by = _exposed(cstart, cend, comm_iv)
        static = {k: int(v) for k, v in sorted(prog.static_bytes.items())}
        peak, peak_t, at_peak = _memory_peak(mem_ev, static)
        tot_model += ex.ranks[c] * prog.model_flops
        tot_exec += ex.ranks[c] * flops
        classes.append(ClassResult(
            class_key=dict(prog.class_key), ranks=ex.ranks[c], nodes=len(prog.nodes), finish_s=finish,
            compute_busy_s=busy, compute_by_category_s=dict(sorted(by_cat.items())),
            compute_by_op_s=dict(sorted(by_op.items())), comm_busy_s=dict(sorted(comm_busy.items())),
            exposed_comm_s=dict(sorted(exposed_by.items())), exposed_comm_total_s=exposed, sync_wait_s=wait,
            bubble_s=max(0.0, step - busy - exposed), optimizer_s=by_cat.get("optimizer", 0.0),
            executed_flops=flops, model_flops=prog.model_flops, memory_peak_bytes=peak,
            memory_peak_time_s=peak_t, memory_at_peak_bytes=at_peak, oom=peak > cap,
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


def _exposed(cstart: list[float], cend: list[float], comm: list[tuple[float, float, str]]
             ) -> tuple[float, dict[str, float]]:
    """Communication time not covered by compute: total over the union, and per label."""
    if not comm:
        return 0.0, {}
    order = sorted(range(len(cstart)), key=cstart.__getitem__)
    cs = [cstart[i] for i in order]
    ce = [cend[i] for i in order]
    pre = [0.0]
    for s, e in zip(cs, ce, strict=True):
        pre.append(pre[-1] + (e - s))

    def covered(x: float) -> float:  # compute busy time in [0, x]
        i = bisect_right(cs, x) - 1
        if i < 0:
            return 0.0
        return pre[i] + min(x, ce[i]) - cs[i]

    raw: dict[str, float] = {}
    for s, e, lab in comm:
        u = (e - s) - (covered(e) - covered(s))
        if u > 0:
            raw[lab] = raw.get(lab, 0.0) + u
    total = 0.0
    ivs = sorted((s, e) for s, e, _ in comm)
    ms, me = ivs[0]
    for s, e in ivs[1:]:
        if s <= me:
            if e > me:
                me = e
            continue
        total += (me - ms) - (covered(me) - covered(ms))
        ms, me = s, e
    total += (me - ms) - (covered(me) - covered(ms))
    total = max(0.0, total)
    rsum = sum(raw.values())
    scale = total / rsum if rsum > 0 else 0.0
    return total, {k: v * scale for k, v in raw.items()}


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
