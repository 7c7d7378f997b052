"""Event-driven execution of every rank class's `Program` together.

One Program stands for all ranks of its class (symmetric ranks are simulated once). All classes
start at time 0 and run concurrently; the step ends when the last node of any class ends.

Execution rules (the contract with the lowering):

* **Dependencies.** A node becomes *ready* when all its ``data_deps`` and ``ctrl_deps`` (ids in the
  same Program, smaller than its own) have finished. Both kinds are enforced alike.
* **Compute stream.** One per class: COMP nodes run one at a time; when the stream is free it takes
  the ready COMP node with the lowest id (ASTRA-sim's issue rule). Duration: :mod:`.compute`.
* **Collective streams.** One per class *per communicator* (axes tuple), like one NCCL stream per
  process group: the COLL nodes of that communicator run strictly in program (id) order, one at a
  time, overlapping compute and collectives of other communicators (no bandwidth contention
  between them is modelled). A COLL node whose axes include a ``class_key`` axis spans several
  classes: the k-th collective over axes ``X`` of every class that agrees with it on the class-key
  axes outside ``X`` forms one instance (NCCL's "same order on every rank" rule); it starts when
  all of them have *posted* it (stream free and node ready) and ends for all at once. A class
  with fewer such collectives simply takes no part in the later instances (e.g. an embedding
  all-reduce only the first and last stages issue); the cost is still that of the full group
  over ``X`` on the mesh. A stream that has posted is blocked until its collective ends. A collective within one class needs no
  matching: all ranks of a class run it at the same time. Duration: the slowest participant's
  alpha-beta cost (:mod:`.collectives`), fastest algorithm.
* **Send/recv.** A SEND in class ``A`` along ``peer_axis`` by ``peer_offset`` goes to class
  ``B = A`` with that coordinate moved (or ``A`` itself when the axis is not in the class key, e.g.
  a ring along CP); it matches the RECV in ``B`` whose peer is ``A`` with the same ``tag``, the
  k-th such SEND with the k-th such RECV. Sends are *eager* (as ASTRA-sim's, and as Megatron's
  batched isend/irecv behave): the transfer starts when the SEND is ready and the directed link
  ``A -> B`` is free (FIFO), lasts ``alpha + S/B`` of the outermost tier the hop crosses, and ends
  the SEND; the RECV ends at the later of its own readiness and the message's arrival. A blocking
  (rendezvous) send would deadlock the usual 1F1B encodings where a stage's next receive is ordered
  after its send. Send/recv occupy neither the compute nor a collective stream.
* **Link contention** (``Machine.link_contention``, off by default: ``sim/machine.py``). Each
  communication knows the seconds its bytes occupy a rank's scale-out port (a send: ``S/B`` of the
  tier it crosses; a collective: its time minus its time with scale-out bandwidth a million times
  larger). A rank's port is two FIFO queues of that work, out and in: a collective (both, on every
  member class) or a send (the sender's out, the receiver's in) first waits for the backlog earlier
  communications left there, then adds its own. So a PP send queued behind a DP bucket on the NIC
  is delayed by the bucket's remaining bytes, while an in-node TP collective (no scale-out work) is
  not, unlike ASTRA-sim's one-communication-per-rank rule. Earlier communications are not slowed
  by later ones (work-conserving, first come first served).
* **Overlap slowdown.** A COMP node that starts while communication of its class is in flight
  runs ``1 + overlap_slowdown`` times slower until that communication's (known) end; collectives
  that start later during the node do not slow it (documented approximation).

Programs are flattened into parallel lists indexed by a global node id; the loop uses one heap of
``(time, id)`` completion events and one ready-heap per compute stream. Events with equal times
are all applied before any compute stream picks its next node, so ties resolve by lowest id.

Chains are simulated as one event: a run of consecutive-id COMP nodes where each depends only on
the one before, which has no other successor. Under the lowest-ready-id rule only a *lower-id*
COMP node that becomes ready while the chain runs could run between its members; the loop
detects that and then re-simulates without merging, so the schedule is always the unmerged one
(``merge_chains=False`` turns merging off; the tests check both agree, including a program that
triggers the fallback). The one approximation it adds: the overlap slowdown of a merged chain
is decided at the chain's start (communication starting mid-chain, which only another class or
an arriving message can cause, does not slow the chain's remaining nodes). Per-node times are
recovered by splitting the chain's interval in proportion to the nodes' own durations.

Spans go one step further, exactly: a block's compute between its one-class collectives (a
tensor-parallel layer is COMP, all-gather, COMP, reduce-scatter, ... each node the only successor
of the one before) runs as one event. The loop times the span's nodes when it starts, as the
unmerged loop would (:func:`_spans`, ``_run``): it cuts the span before a collective whose stream
is busy, runs the head alone when another COMP node is ready (it would take a collective's gap),
re-times the nodes not yet started when communication of the class starts meanwhile (the
overlap slowdown they would see), and gives up (the caller runs again without spans) when a COMP
node or a held stream's collective becomes ready inside the span. Start, end and post of every
node equal the run without spans (tests/test_engine_spans.py); a pipeline stage's event count
drops several-fold.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import chain
from numbers import Integral, Real
from typing import NoReturn

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.gcpause import paused_gc
from tensorstage.schedule.program import NodeKind, Program
from tensorstage.sim.collectives import (
    Fabric,
    collective_time_s,
    mesh_members_per_domain,
    p2p_tier,
    p2p_time_s,
)
from tensorstage.sim.machine import Machine

K_COMP, K_COLL, K_SEND, K_RECV = 0, 1, 2, 3
_KIND = {NodeKind.COMP: K_COMP, NodeKind.COLL: K_COLL, NodeKind.SEND: K_SEND, NodeKind.RECV: K_RECV}
_KMAP = [-1] * (max(int(k) for k in NodeKind) + 1)  # list lookup by int value: cheaper than hashing an enum
for _k, _v in _KIND.items():
    _KMAP[int(_k)] = _v


def _listed(array_field: str) -> cached_property:
    """A list copy of the array field ``array_field``, made on first use (for code that indexes node
    by node: the timeline writer, replay, tests)."""
    return cached_property(lambda self: getattr(self, array_field).tolist())


@dataclass
class Execution:
    """Raw outcome of :func:`execute`: start/end of every node, by global id (class offset + node id)."""

    programs: list[Program]
    machine: Machine
    world: int
    ranks: list[int]  # ranks per class
    offsets: list[int]  # global id of node 0 of each class; offsets[-1] = total nodes
    # per node, as arrays (the summary reduces them as such); ``kind``, ``start``, ``end``, ``post``
    # give them as lists, made on first use
    kind_a: np.ndarray  # engine kind code (K_COMP, K_COLL, K_SEND, K_RECV), int8
    start_a: np.ndarray
    end_a: np.ndarray
    post_a: np.ndarray  # COLL/SEND/RECV: when the node was ready on its stream (start - post = sync wait); else -1
    algorithm: dict[int, str] = field(default_factory=dict)  # COLL gid -> algorithm chosen
    step_time_s: float = 0.0
    #: per class, what the engine already read off its nodes, so the summary need not read them again:
    #: ``(positions of its COMP nodes, each one's key id, the distinct (flops, tensor_bytes, op, gemm,
    #: category) keys)`` and the label (``all_reduce/tp``, ``send/pp``) of each communication node in id
    #: order, encoded: ``(code of each node, {label: code})``. ``None`` for an Execution built by hand
    #: (the summary then reads the nodes).
    comp_keys: list[tuple[np.ndarray, np.ndarray, list[tuple]]] | None = None
    comm_labels: list[tuple[np.ndarray, dict[str, int]]] | None = None

    kind = _listed("kind_a")
    start = _listed("start_a")
    end = _listed("end_a")
    post = _listed("post_a")


def _class_key(p: Program) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(p.class_key.items()))


def execute(programs: Sequence[Program], mesh: object, machine: Machine, merge_chains: bool = True
            ) -> Execution:
    """Run all classes' Programs together on ``machine`` (see module docstring for the rules).

    ``mesh`` is the ``tensorstage.parallel.mesh.Mesh`` the programs were lowered for: it gives
    ranks per class, group placement on the fabric, and send/recv peers. Raises ``SpecError``
    for inconsistent programs (unknown peers, unmatched send/recv, dependency on a later id,
    deadlock). The cyclic garbage collector is paused meanwhile: the setup allocates one small
    list per node and nothing cyclic, and collector passes over them cost ~30 % of the run.
    """
    with paused_gc():
        return _execute(programs, mesh, machine, merge_chains)


def _execute(programs: Sequence[Program], mesh: object, machine: Machine, merge_chains: bool) -> Execution:
    programs = list(programs)
    if not programs:
        raise SpecError("programs", "nothing to simulate: no Program given")
    keys = [_class_key(p) for p in programs]
    index = {k: i for i, k in enumerate(keys)}
    if len(index) != len(keys):
        raise SpecError("programs", "two Programs have the same class_key")
    world = int(mesh.world)  # type: ignore[attr-defined]
    ranks = []
    for p in programs:
        n = 1
        for a in p.class_key:
            n *= mesh.size(a)  # type: ignore[attr-defined]
        ranks.append(world // n)

    offsets = [0]
    for p in programs:
        offsets.append(offsets[-1] + len(p.nodes))
    total = offsets[-1]
    # vectorized per-node arrays: kind codes, dependency CSR, COMP durations (see _flatten)
    kind_np, cls_np, indeg_np, succ_ptr, succ_idx = _flatten(programs, offsets, total)
    dur_a0, comp_keys = _comp_durations(programs, offsets, kind_np, machine.compute)
    fabric = machine.fabric
    # link contention: seconds each communication keeps a rank's scale-out port busy (0: none)
    contention = bool(getattr(machine, "link_contention", False)) and len(fabric.tiers) > 1
    comm = _Communication(programs, offsets, kind_np, keys, index, mesh, fabric, contention)
    dur_a = dur_a0
    dur_a[comm.coll_g] = comm.coll_dur
    nic_a = comm.nic
    stream_np, inst_np, queues, algorithm, comm_labels = comm.stream_of, comm.inst_of, comm.queues, \
        comm.algorithm, comm.labels

    # collective instances: one duration for all participants
    inst_dur_a = dur_a[comm.inst_first]
    inst_nic_a = nic_a[comm.inst_first]
    for iid, members in comm.inst_multi.items():
        inst_dur_a[iid] = max(dur_a[g] for g in members)
        inst_nic_a[iid] = max(nic_a[g] for g in members)

    # send/recv pairing
    partner, link_np, nlinks = _pair_p2p(comm, keys, mesh, fabric, contention, dur_a, nic_a)

    # Chains: a COMP node whose only dependency is the node just before it, itself a COMP node whose
    # only successor it is, is simulated with it as one event ("super node"). If a lower-id COMP node
    # becomes ready while such a chain runs (it would have cut in), the loop gives up and the
    # step is simulated again without merging.
    kind_a = kind_np.astype(np.int8)
    # one-class collectives without port backlog (their instance is themselves alone): their
    # duration (the loop starts them inline; spans join them), else -1
    solo_inst = np.ones(len(inst_dur_a), dtype=bool)
    if comm.inst_multi:
        solo_inst[list(comm.inst_multi)] = False
    solo_inst &= ~(inst_nic_a > 0.0)
    solo_dur = np.full(total, -1.0)
    coll_inst = inst_np[comm.coll_g]
    solo_dur[comm.coll_g] = np.where(solo_inst[coll_inst], inst_dur_a[coll_inst], -1.0)
    solo_a = solo_dur >= 0.0
    levels = ((True, True), (True, False), (False, False)) if merge_chains else ((False, False),)
    for merge, spans in levels:
        is_head = np.ones(total, dtype=bool)
        if merge and total > 1:
            nsucc = np.diff(succ_ptr)
            first_succ = np.where(nsucc == 1, succ_idx[np.minimum(succ_ptr[:-1], max(len(succ_idx) - 1, 0))]
                                  if len(succ_idx) else -1, -1)
            indeg_a, cls_a = indeg_np, cls_np
            chained = ((kind_a[1:] == K_COMP) & (kind_a[:-1] == K_COMP) & (indeg_a[1:] == 1)
                       & (first_succ[:-1] == np.arange(1, total)) & (cls_a[1:] == cls_a[:-1]))
            is_head[1:] = ~chained
        heads_a = np.flatnonzero(is_head)
        sup_a = np.cumsum(is_head) - 1
        dur_s_a = np.add.reduceat(dur_a, heads_a) if total else dur_a
        ns = len(heads_a)
        tails_a = np.empty(ns, dtype=np.int64)
        tails_a[:-1] = heads_a[1:] - 1
        if ns:
            tails_a[-1] = total - 1
        kind_s = kind_a[heads_a].tolist()
        cls_s = cls_np[heads_a].tolist()
        indeg_s = indeg_np[heads_a].tolist()
        dur_s = dur_s_a.tolist()
        cnt_s = succ_ptr[tails_a + 1] - succ_ptr[tails_a]
        ptr_s = np.zeros(ns + 1, dtype=np.int64)
        np.cumsum(cnt_s, out=ptr_s[1:])
        pos = np.repeat(succ_ptr[tails_a] - ptr_s[:-1], cnt_s) + np.arange(int(ptr_s[-1]))
        sidx_s = sup_a[succ_idx[pos]]
        succ_s = (ptr_s.tolist(), sidx_s.tolist())
        stream_s = stream_np[heads_a].tolist()
        inst_s = inst_np[heads_a].tolist()
        ph = partner[heads_a]
        partner_s = np.where(ph >= 0, sup_a[np.maximum(ph, 0)], -1).tolist()
        link_s = link_np[heads_a].tolist()
        queues_s = [sup_a[q].tolist() for q in queues]
        inst_multi_s = {iid: sup_a[members].tolist() for iid, members in comm.inst_multi.items()}
        span_end = (_spans(kind_a[heads_a], cls_np[heads_a], indeg_np[heads_a], ptr_s, sidx_s, solo_a[heads_a])
                    if spans else [0] * ns)

        out = _run(len(programs), ns, kind_s, dur_s, cls_s, indeg_s, succ_s, stream_s, queues_s, inst_s,
                   inst_multi_s, inst_dur_a.tolist(), partner_s, link_s, nlinks, machine.overlap_slowdown,
                   (tails_a > heads_a).tolist(), inst_nic_a.tolist(), nic_a[heads_a].tolist(), span_end,
                   solo_dur[heads_a].tolist())
        if out is not None:
            break
    start_s, end_s, post_s = out  # type: ignore[misc]
    # per-node times: split each super node's interval in proportion to its members' durations
    ss, es = np.array(start_s), np.array(end_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(dur_s_a > 0, (es - ss) / dur_s_a, 0.0)
    before = np.cumsum(dur_a) - dur_a  # durations before each node, globally
    within = before - before[heads_a][sup_a]
    end_a = ss[sup_a] + (within + dur_a) * scale[sup_a]
    end_a[tails_a] = es
    start_a = np.empty(total)
    start_a[1:] = end_a[:-1]  # inside a chain a node starts exactly when the previous one ends
    start_a[heads_a] = ss
    post_a = np.full(total, -1.0)
    post_a[heads_a] = post_s
    missing = np.flatnonzero(end_a < 0)
    if len(missing):
        g = int(missing[0])
        c = int(cls_np[g])
        node = programs[c].nodes[g - offsets[c]]
        raise SpecError("programs", f"deadlock: {len(missing)} node(s) never ran; first: class {programs[c].class_key} "
                        f"node {node.id} ({node.name}, {node.kind.name})")
    return Execution(programs, machine, world, ranks, offsets, kind_a, start_a, end_a, post_a, algorithm,
                     float(end_a.max()) if total else 0.0, comp_keys, comm_labels)


class _Communication:
    """Pass 1 over the communication nodes, class by class, column-wise where it can be.

    Collectives: duration and algorithm (once per distinct (kind, bytes, axes, route)), the seconds
    they keep the scale-out ports busy (link contention), their stream (one per class and axes,
    ``queues[sid]`` its collectives in id order) and instance: a collective of a stream that spans
    class-key axes is matched with the same-ordinal collective of every class agreeing on the other
    axes (``inst_multi`` lists such instances' members); any other is an instance alone. Send/recv:
    columns over all classes in class then id order (``p2p_*``: id, is a send, sending and receiving
    class, tag, bytes, route = index into ``routes``) for :func:`_pair_p2p`. Labels of every
    communication node for the summary (``Execution.comm_labels``)."""

    def __init__(self, programs: list[Program], offsets: list[int], kind: np.ndarray, keys: list, index: dict,
                 mesh: object, fabric: Fabric, contention: bool) -> None:
        total = offsets[-1]
        fast_fabric = _fast_scaleout(fabric) if contention else fabric
        self.nic = np.zeros(total)
        self.stream_of = np.full(total, -1, dtype=np.int64)
        self.inst_of = np.full(total, -1, dtype=np.int64)
        self.queues: list[np.ndarray] = []
        self.algorithm: dict[int, str] = {}
        self.labels: list[tuple[np.ndarray, dict[str, int]]] = []
        # send/recv nodes, as columns over all classes: global id, is a send, sending and receiving
        # class, tag, bytes, and route (index into ``self.routes``: the (peer axis, offset) it moves along)
        p2p_cols: list[tuple[np.ndarray, ...]] = []
        route_index: dict[tuple[str, int], int] = {}
        inst_first: list[np.ndarray] = []
        ninst = 0
        self.inst_multi: dict[int, list[int]] = {}
        inst_index: dict[tuple, int] = {}
        span_first: dict[int, int] = {}  # first member of each class-spanning instance
        coll_g, coll_dur = [], []
        members_cache: dict[tuple[str, ...], tuple[int, ...]] = {}
        cost_cache: dict[tuple, tuple[float, str, float]] = {}
        label_cache: dict[tuple, str] = {}
        peer_cache: dict[tuple[int, str, int], int] = {}
        comm_g = np.flatnonzero(kind != K_COMP)
        bounds = np.searchsorted(comm_g, offsets)
        for c, prog in enumerate(programs):
            off, ck, pnodes = offsets[c], prog.class_key, prog.nodes
            gs = comm_g[bounds[c]:bounds[c + 1]]
            codes = kind[gs]
            # each node's label code (``table``: label -> code), collectives' from their cost keys below
            table: dict[str, int] = {}
            lab_code = np.zeros(len(gs), dtype=np.int64)

            sel = np.flatnonzero(codes == K_COLL)
            if len(sel):
                cg = gs[sel]
                cnodes = [pnodes[j] for j in (cg - off).tolist()]
                kid: dict[tuple, int] = {}
                ids = np.fromiter([kid.setdefault((x.comm, x.comm_bytes, x.axes, x.route), len(kid)) for x in cnodes],
                                  dtype=np.int64, count=len(cnodes))
                costs = []
                for k in kid:
                    cost = cost_cache.get(k)
                    if cost is None:
                        comm, nbytes, axes, route = k
                        if comm is None:
                            x = cnodes[int(np.flatnonzero(ids == kid[k])[0])]
                            raise SpecError("programs", f"class {ck}: collective node {x.id} ({x.name}) has no comm kind")
                        members = members_cache.get(axes)
                        if members is None:
                            members = members_cache[axes] = mesh_members_per_domain(mesh, axes, fabric)
                        t, algo = collective_time_s(comm, nbytes, members, fabric, route)
                        w = max(0.0, t - collective_time_s(comm, nbytes, members, fast_fabric, route)[0]) \
                            if contention else 0.0
                        cost = cost_cache[k] = (t, algo, w)
                    costs.append(cost)
                lcode = []
                for k in kid:
                    lk = (K_COLL, k[0], k[2])
                    lab = label_cache.get(lk)
                    if lab is None:
                        lab = label_cache[lk] = comm_label(K_COLL, k[0], k[2], "")
                    lcode.append(table.setdefault(lab, len(table)))
                lab_code[sel] = np.array(lcode, dtype=np.int64)[ids]
                coll_g.append(cg)
                coll_dur.append(np.array([x[0] for x in costs])[ids])
                self.algorithm.update(zip(cg.tolist(), np.array([x[1] for x in costs], dtype=object)[ids].tolist(),
                                          strict=True))
                if contention:
                    self.nic[cg] = np.array([x[2] for x in costs])[ids]
                # streams: one per axes tuple of this class, in order of first use
                axes_of = [k[2] for k in kid]
                sid_of_axes: dict[tuple[str, ...], int] = {}
                for a in axes_of:
                    sid_of_axes.setdefault(a, len(sid_of_axes))
                local = np.array([sid_of_axes[a] for a in axes_of], dtype=np.int64)[ids]
                for axes, ls in sid_of_axes.items():
                    sid = len(self.queues)
                    q = cg[local == ls]
                    self.queues.append(q)
                    self.stream_of[q] = sid
                    if any(a in axes for a in ck):  # spans classes: match by ordinal with the others
                        proj = tuple((a, v) for a, v in keys[c] if a not in axes)
                        for n, g in enumerate(q.tolist()):
                            iid = inst_index.get((axes, proj, n))
                            if iid is None:
                                iid = inst_index[(axes, proj, n)] = ninst
                                inst_first.append(np.array([g]))
                                span_first[iid] = g
                                ninst += 1
                            else:
                                self.inst_multi.setdefault(iid, [span_first[iid]]).append(g)
                            self.inst_of[g] = iid
                    else:
                        self.inst_of[q] = np.arange(ninst, ninst + len(q))
                        inst_first.append(q)
                        ninst += len(q)

            psel = np.flatnonzero(codes != K_COLL)
            if len(psel):
                pg, pcodes = gs[psel], codes[psel]
                pn = [pnodes[j] for j in (pg - off).tolist()]
                rid: dict[tuple[str, int], int] = {}
                rids = np.fromiter([rid.setdefault((x.peer_axis, x.peer_offset), len(rid)) for x in pn],
                                   dtype=np.int64, count=len(pn))
                peer, route, lab_s, lab_r = [], [], [], []
                for pax, poff in rid:
                    pk = (c, pax, poff)
                    pc = peer_cache.get(pk, -1)
                    if pc < 0:
                        pc = peer_cache[pk] = _peer_class(c, keys, index, ck, pax, poff, mesh)
                    peer.append(pc)
                    route.append(route_index.setdefault((pax, poff), len(route_index)))
                    for code, out in ((K_SEND, lab_s), (K_RECV, lab_r)):
                        lk = (code, pax)
                        lab = label_cache.get(lk)
                        if lab is None:
                            lab = label_cache[lk] = comm_label(code, None, (), pax)
                        out.append(lab)
                is_send = pcodes == K_SEND
                # label codes, numbered in order of first use (only labels some node carries)
                pair = rids * 2 + ~is_send
                used = np.unique(pair).tolist()
                code_of = np.zeros(2 * len(rid), dtype=np.int64)
                for u in used:
                    code_of[u] = table.setdefault((lab_r if u & 1 else lab_s)[u >> 1], len(table))
                lab_code[psel] = code_of[pair]
                peer_a = np.array(peer, dtype=np.int64)[rids]
                p2p_cols.append((pg, is_send, np.where(is_send, c, peer_a), np.where(is_send, peer_a, c),
                                 _int_column([x.tag for x in pn], ck, "tags", integer=True),
                                 _int_column([x.comm_bytes for x in pn], ck, "message sizes (comm_bytes)"),
                                 np.array(route, dtype=np.int64)[rids]))
            self.labels.append((lab_code, table))
        self.routes: list[tuple[str, int]] = list(route_index)
        cols = [np.concatenate(x) for x in zip(*p2p_cols, strict=True)] if p2p_cols else \
            [np.zeros(0, dtype=bool if i == 1 else np.int64) for i in range(7)]
        self.p2p_g, self.p2p_send, self.p2p_src, self.p2p_dst, self.p2p_tag, self.p2p_bytes, self.p2p_route = cols
        self.coll_g = np.concatenate(coll_g) if coll_g else np.zeros(0, dtype=np.int64)
        self.coll_dur = np.concatenate(coll_dur) if coll_dur else np.zeros(0)
        self.inst_first = np.concatenate(inst_first) if inst_first else np.zeros(0, dtype=np.int64)


def _pair_p2p(comm: _Communication, keys: list, mesh: object, fabric: Fabric, contention: bool,
              dur: np.ndarray, nic: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Match every send with its recv, column-wise: the k-th send from class A to class B with a tag
    pairs with the k-th recv in B from A with that tag (both in id order). Sets both nodes' duration
    (``alpha + S/B`` over the outermost tier the sender's route crosses) and, under link contention,
    the seconds a send keeps the scale-out port busy. Returns each node's partner (-1: none), its
    link (one per sending class, receiving class, axis and direction; -1: none) and the link count.
    Raises ``SpecError`` for unmatched or differently sized pairs."""
    total = len(dur)
    partner = np.full(total, -1, dtype=np.int64)
    link = np.full(total, -1, dtype=np.int64)
    send = comm.p2p_send
    if not len(send):
        return partner, link, 0
    s, r = np.flatnonzero(send), np.flatnonzero(~send)
    src, dst, tag, g = comm.p2p_src, comm.p2p_dst, comm.p2p_tag, comm.p2p_g
    so = s[np.lexsort((g[s], tag[s], dst[s], src[s]))]  # by (sender, receiver, tag), then id
    ro = r[np.lexsort((g[r], tag[r], dst[r], src[r]))]
    nb = comm.p2p_bytes
    if len(so) != len(ro) or (src[so] != src[ro]).any() or (dst[so] != dst[ro]).any() or (tag[so] != tag[ro]).any() \
            or (nb[so] != nb[ro]).any():
        _p2p_error(comm, keys)
    gs, gr = g[so], g[ro]
    partner[gs], partner[gr] = gr, gs
    # duration per distinct (bytes, tier); the tier is the sender's route's
    tiers = np.array([p2p_tier(mesh, a, o, fabric) for a, o in comm.routes], dtype=np.int64)
    tier = tiers[comm.p2p_route[so]]
    pairs, inv = np.unique(np.stack((nb[so], tier)), axis=1, return_inverse=True)
    times = np.array([p2p_time_s(b, int(t), fabric) for b, t in pairs.T.tolist()])
    dur[gs] = dur[gr] = times[inv.reshape(-1)]
    if contention:
        bw = np.array([t.bw_Bps for t in fabric.tiers])
        out = tier > 0
        nic[gs[out]] = nb[so][out] / bw[tier[out]]
    # links: (sender, receiver, axis, direction); the direction is the sign of the route's offset
    way = {}
    way_of = np.array([way.setdefault((a, 1 if o >= 0 else -1), len(way)) for a, o in comm.routes], dtype=np.int64)
    lk = (src[so] * len(keys) + dst[so]) * max(len(way), 1) + way_of[comm.p2p_route[so]]
    ulk, lid = np.unique(lk, return_inverse=True)
    link[gs] = link[gr] = lid.reshape(-1)
    return partner, link, len(ulk)


def _p2p_error(comm: _Communication, keys: list) -> NoReturn:
    """Raise the ``SpecError`` for sends and recvs that do not pair up one to one, or pair with
    different sizes: the first problem met going through the (sender, receiver, tag) groups in the
    order of their first send (class order, then id) - its counts, then its pairs' sizes in id order -
    and then the receives no send matches. Only runs when :func:`_pair_p2p` found a problem."""
    sends: dict[tuple[int, int, int], list[int]] = {}
    recvs: dict[tuple[int, int, int], list[int]] = {}
    for i, (a, b, t, is_send) in enumerate(zip(comm.p2p_src.tolist(), comm.p2p_dst.tolist(), comm.p2p_tag.tolist(),
                                               comm.p2p_send.tolist(), strict=True)):
        (sends if is_send else recvs).setdefault((a, b, t), []).append(i)
    nb = comm.p2p_bytes.tolist()
    for (a, b, t), sl in sends.items():
        rl = recvs.get((a, b, t), [])
        if len(rl) != len(sl):
            raise SpecError("programs", f"send/recv mismatch between classes {keys[a]} -> {keys[b]} tag {t}: "
                            f"{len(sl)} send(s), {len(rl)} recv(s)")
        for i, j in zip(sl, rl, strict=True):
            if nb[i] != nb[j]:
                raise SpecError("programs", f"send/recv size mismatch for tag {t}: {nb[i]} vs {nb[j]} bytes")
    for a, b, t in recvs:
        if (a, b, t) not in sends:
            raise SpecError("programs", f"recv without send: class {keys[b]} expects tag {t} from {keys[a]}")
    raise SpecError("programs", "send/recv nodes do not pair up")  # not reached: _pair_p2p found a problem


def _int_column(values: list, class_key: dict[str, int], what: str, integer: bool = False) -> np.ndarray:
    """``values`` as an int64 column (float64 where some are fractional and ``integer`` is false);
    ``SpecError`` naming ``what`` for anything else (a string tag, an integer past int64)."""
    if set(map(type, values)) <= {int, bool}:
        with suppress(OverflowError):
            return np.array(values, dtype=np.int64)
    out: list[int | float] = []
    for v in values:
        if isinstance(v, Integral) and -2**63 <= v < 2**63:
            out.append(int(v))
        elif not integer and isinstance(v, Real):
            out.append(float(v))
        else:
            raise SpecError("programs", f"class {class_key}: send/recv {what} must be "
                            f"{'integers' if integer else 'numbers'} within int64; got {v!r}")
    return np.array(out, dtype=np.int64 if all(type(x) is int for x in out) else np.float64)


def _spans(kind: np.ndarray, cls: np.ndarray, indeg: np.ndarray, ptr: np.ndarray, idx: np.ndarray,
           solo: np.ndarray) -> list[int]:
    """Serial spans over (chain-merged) nodes: per node, one past the last node of the span it heads, else 0.

    A span is a run of consecutive ids of one class, COMP nodes and one-class collectives (``solo``),
    each the only dependency of the next and the next its only successor, starting with a COMP node
    and holding at least one collective: a block's compute between its tensor-parallel collectives.
    The loop runs a span as one event (``_run``), cut short or given up where the unmerged
    program would differ (module docstring).
    """
    n = len(kind)
    out = [0] * n
    if n < 2:
        return out
    ok = (kind == K_COMP) | solo
    nsucc = np.diff(ptr)
    first = np.where(nsucc == 1, idx[np.minimum(ptr[:-1], max(len(idx) - 1, 0))] if len(idx) else -1, -1)
    link = ((nsucc[:-1] == 1) & (first[:-1] == np.arange(1, n)) & (indeg[1:] == 1) & (cls[1:] == cls[:-1])
            & ok[:-1] & ok[1:])
    edge = np.diff(np.concatenate(([0], link.astype(np.int8), [0])))
    comp = (kind == K_COMP).tolist()
    for s, e in zip(np.flatnonzero(edge == 1).tolist(), np.flatnonzero(edge == -1).tolist(), strict=True):
        while s < e and not comp[s]:  # a span starts on the compute stream
            s += 1
        if s < e and not all(comp[s:e + 1]):
            out[s] = e + 1
    return out


def _fast_scaleout(fabric: Fabric) -> Fabric:
    """``fabric`` with scale-out bandwidth a million times larger: a collective's time drops by the
    seconds its bytes occupy the scale-out ports (what link contention charges to others)."""
    tiers = tuple(t if i == 0 else replace(t, bw_Bps=t.bw_Bps * 1e6) for i, t in enumerate(fabric.tiers))
    return replace(fabric, tiers=tiers)


def _flatten(programs: list[Program], offsets: list[int], total: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-node arrays in global ids, built column-wise (no per-node Python loop body).

    Returns engine kind codes, class of each node, in-degree (data and control dependencies
    merged, duplicates counted once) and the successor lists as CSR (``ptr``, ``idx``; each list
    in ascending id order). Raises ``SpecError`` for non-dense ids, dependencies on a later id
    and unsupported node kinds.
    """
    kind = np.empty(total, dtype=np.int64)
    cls = np.empty(total, dtype=np.int64)
    srcs, deps = [], []
    for c, p in enumerate(programs):
        nodes, off, n = p.nodes, offsets[c], len(p.nodes)
        cls[off:off + n] = c
        if not n:
            continue
        ids = np.fromiter([x.id for x in nodes], dtype=np.int64, count=n)
        ar = np.arange(n, dtype=np.int64)
        if not np.array_equal(ids, ar):
            j = int(np.flatnonzero(ids != ar)[0])
            raise SpecError("programs", f"class {p.class_key}: node ids must be dense 0..n-1; node {j} has id {ids[j]}")
        raw = np.fromiter([x.kind for x in nodes], dtype=np.int64, count=n)
        codes = np.asarray(_KMAP + [-1], dtype=np.int64)[np.clip(raw, 0, len(_KMAP))]
        if (codes < 0).any():
            j = int(np.flatnonzero(codes < 0)[0])
            raise SpecError("programs", f"class {p.class_key}: node {j} has unsupported kind {nodes[j].kind!r}")
        kind[off:off + n] = codes
        dd = [x.data_deps for x in nodes]
        cd = [x.ctrl_deps for x in nodes]
        ld = np.fromiter(map(len, dd), dtype=np.int64, count=n)
        lc = np.fromiter(map(len, cd), dtype=np.int64, count=n)
        src = np.concatenate((np.repeat(ar, ld), np.repeat(ar, lc)))
        dep = np.concatenate((np.fromiter(chain.from_iterable(dd), dtype=np.int64, count=int(ld.sum())),
                              np.fromiter(chain.from_iterable(cd), dtype=np.int64, count=int(lc.sum()))))
        bad = (dep < 0) | (dep >= src)
        if bad.any():
            i = int(np.flatnonzero(bad)[np.argmin(src[bad])])
            j, d = int(src[i]), int(dep[i])
            raise SpecError("programs", f"class {p.class_key}: node {j} ({nodes[j].name}) depends on {d}, "
                            "not an earlier id")
        # merged, deduplicated, sorted by (node, dependency): a stable (merge) sort of the two runs that are
        # each nearly sorted already, ~15x faster than np.unique's quicksort
        key = np.sort(src * n + dep, kind="stable")
        if len(key) > 1:
            keep = np.empty(len(key), dtype=bool)
            keep[0] = True
            np.not_equal(key[1:], key[:-1], out=keep[1:])
            if not keep.all():
                key = key[keep]
        srcs.append(key // n + off)
        deps.append(key % n + off)
    src = np.concatenate(srcs) if srcs else np.zeros(0, dtype=np.int64)
    dep = np.concatenate(deps) if deps else np.zeros(0, dtype=np.int64)
    indeg = np.bincount(src, minlength=total)
    order = np.argsort(dep, kind="stable")  # src ascending within each dependency
    ptr = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(np.bincount(dep, minlength=total), out=ptr[1:])
    return kind, cls, indeg, ptr, src[order]


def _comp_durations(programs: list[Program], offsets: list[int], kind: np.ndarray, comp_model: object
                    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, list[tuple]]]]:
    """Duration of every COMP node (0 elsewhere): ``comp_model.time_s`` once per distinct
    ``(flops, tensor_bytes, op, gemm, category)``; and per class the COMP positions, key ids and
    distinct keys (``Execution.comp_keys``)."""
    dur = np.zeros(len(kind), dtype=np.float64)
    cache: dict[tuple, float] = {}
    time_s = comp_model.time_s  # type: ignore[attr-defined]
    per_class = []
    for c, p in enumerate(programs):
        off, nodes = offsets[c], p.nodes
        sel = np.flatnonzero(kind[off:off + len(nodes)] == K_COMP)
        if not len(sel):
            per_class.append((sel, np.zeros(0, dtype=np.int64), []))
            continue
        comp = [nodes[j] for j in sel.tolist()] if len(sel) < len(nodes) else nodes
        kid: dict[tuple, int] = {}
        ids = np.fromiter([kid.setdefault((x.flops, x.tensor_bytes, x.op, x.gemm, x.category), len(kid))
                           for x in comp], dtype=np.int64, count=len(comp))
        keys = list(kid)
        for k in keys:
            if k not in cache:
                cache[k] = time_s(*k)
        dur[off + sel] = np.array([cache[k] for k in keys], dtype=np.float64)[ids]
        per_class.append((sel, ids, keys))
    return dur, per_class


def comm_label(code: int, comm: object, axes: Sequence[str], peer_axis: str) -> str:
    """What a communication node is reported as: ``all_reduce/tp`` (collective kind and axes), or
    ``send/pp`` / ``recv/pp`` (direction and peer axis); ``code`` is the engine kind code."""
    if code == K_COLL:
        kind = comm.name.lower() if comm is not None else "coll"  # type: ignore[attr-defined]
        return f"{kind}/{','.join(axes)}"
    return f"{'send' if code == K_SEND else 'recv'}/{peer_axis}"


def _peer_class(c: int, keys: list, index: dict, class_key: dict[str, int], axis: str, offset: int,
                mesh: object) -> int:
    if not axis:
        raise SpecError("programs", f"class {class_key}: send/recv node without peer_axis")
    if axis not in class_key:
        mesh.axis(axis)  # type: ignore[attr-defined]  # validates the name
        return c
    size = mesh.axis(axis).size  # type: ignore[attr-defined]
    moved = dict(class_key)
    moved[axis] = (moved[axis] + offset) % size
    peer = index.get(tuple(sorted(moved.items())))
    if peer is None:
        raise SpecError("programs", f"class {class_key}: peer class {moved} along {axis} has no Program")
    return peer


def _run(nclasses, total, kind, dur, cls, indeg, succ, stream_of, queues, inst_of, inst_multi, inst_dur,
         partner, link_of, nlinks, slowdown, multi, inst_nic, nic, span_end, solo):
    """The event loop over flat lists (kept free of attribute lookups: it is the hot path).

    Returns ``None`` when a merged chain would have been interleaved with a lower-id COMP node
    that became ready while it ran (``multi[g]``: ``g`` is a chain of several nodes), or when a
    span (``span_end[g] > 0``: nodes ``g .. span_end[g] - 1``, see :func:`_spans`) meets what the
    unmerged program would run in one of its collectives' gaps; the caller then runs again
    without merging, so the result is always that of the unmerged program.

    A span is timed when it starts, node by node as the unmerged loop would (a COMP node slowed
    while communication of its class is in flight, a collective for its own duration); its
    collectives' streams are held until it ends. Communication of the class that starts while it
    runs re-times its nodes not yet started (:func:`retime`), as their unmerged starts would see it.
    ``solo[g]``: the duration of a collective whose instance is itself alone (inside one class) and
    leaves no port backlog, else -1 (the loop starts these inline; spans join them).
    """
    sptr, sidx = succ  # successors of super node g: sidx[sptr[g]:sptr[g + 1]]
    running = [-1] * nclasses  # super node on each compute stream
    run_end = [0.0] * nclasses
    start = [-1.0] * total
    end = [-1.0] * total
    post = [-1.0] * total
    indeg = list(indeg)
    ready_heaps: list[list[int]] = [[] for _ in range(nclasses)]
    comp_busy = [False] * nclasses
    comm_until = [0.0] * nclasses  # latest end of in-flight communication per class
    nstreams = len(queues)
    qpos = [0] * nstreams
    sbusy = [False] * nstreams
    is_ready = bytearray(total)
    posted_cnt = [0] * len(inst_dur)
    link_free = [0.0] * nlinks
    events: list[tuple[float, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    factor = 1.0 + slowdown
    tx_free = [0.0] * nclasses  # link contention: when each class's scale-out port has sent its backlog
    rx_free = [0.0] * nclasses  # ... and received it
    span_on = [False] * nclasses  # a span runs on the class's compute stream (running[c] is its head)
    is_tail = bytearray(total)  # the last node of each span: 1 while it runs, 2 once it has ended
    span_stop = [0] * nclasses  # one past it
    held: list[list[int]] = [[] for _ in range(nclasses)]  # the streams a running span holds
    holder = [False] * nstreams

    def start_coll(g: int, t: float) -> None:
        sid = stream_of[g]
        sbusy[sid] = True
        post[g] = t
        iid = inst_of[g]
        posted_cnt[iid] += 1
        members = inst_multi.get(iid) or (g,)
        if posted_cnt[iid] == len(members):
            e = t + inst_dur[iid]
            w = inst_nic[iid]
            if w > 0.0:  # wait for the backlog other traffic left on the members' scale-out ports
                b = t
                for m in members:
                    cm = cls[m]
                    b = max(b, tx_free[cm], rx_free[cm])
                e += b - t
                for m in members:
                    cm = cls[m]
                    tx_free[cm] = rx_free[cm] = b + w
            for m in members:
                start[m] = t
                push(events, (e, m))
                cm = cls[m]
                if comm_until[cm] < e:
                    comm_until[cm] = e
                    if span_on[cm]:
                        retime(cm, t)

    def time_span(x: int, m: int, t: float, cu: float) -> float:
        """Start and end of nodes ``x .. m - 1`` (a span, or one COMP node) run back to back from
        ``t`` with class communication in flight until ``cu``: a COMP node runs ``1 + slowdown``
        times slower until ``cu``, a collective for its own duration; returns the last end."""
        for y in range(x, m):
            start[y] = t
            if kind[y] == K_COMP:
                d = dur[y]
                if slowdown and cu > t:
                    span = cu - t
                    if d * factor <= span:
                        d *= factor
                    else:
                        d = span + (d - span / factor)
                t += d
            else:
                post[y] = t
                t += solo[y]
            end[y] = t
        return t

    def open_span(c: int, g: int, m: int) -> int:
        """One past the last node of the span headed by ``g`` that can run as one event now (at
        most ``m``; ``g + 1``: none, ``g`` runs alone): it stops before a collective whose stream is
        busy or would first run another collective, and before a stream's first collective in it
        when a later collective of that stream is ready already (unmerged, that one would start
        within the span). Holds the streams of the collectives it keeps."""
        while True:
            adv: dict[int, int] = {}  # stream -> the span's collectives on it
            first: dict[int, int] = {}
            stop = m
            for x in range(g + 1, m):
                if kind[x] != K_COMP:
                    sid = stream_of[x]
                    n = adv.get(sid, 0)
                    if (not n and sbusy[sid]) or queues[sid][qpos[sid] + n] != x:
                        stop = x
                        break
                    if not n:
                        first[sid] = x
                    adv[sid] = n + 1
            for sid, n in adv.items():
                q = queues[sid]
                p = qpos[sid] + n
                if p < len(q) and is_ready[q[p]] and first[sid] < stop:
                    stop = first[sid]
            if stop == m:
                break
            m = stop
        if m > g + 1:
            hs = held[c]
            for sid, n in adv.items():
                qpos[sid] += n
                sbusy[sid] = holder[sid] = True
                hs.append(sid)
        return m

    def retime(c: int, t: float) -> None:
        """Time again the nodes of class ``c``'s running span that start at ``t`` or later (COMP
        nodes: an unmerged one starting then sees the communication that just started at ``t``)."""
        x, m = running[c], span_stop[c]
        while x < m and (kind[x] != K_COMP or start[x] < t):
            x += 1
        if x == m:
            return
        old = end[m - 1]
        t = time_span(x, m, start[x], comm_until[c])
        if t != old:  # the event at the old end is then stale (skipped when popped)
            run_end[c] = t
            push(events, (t, m - 1))

    arrival = [-1.0] * total  # RECV gid -> when its message has fully arrived
    xfer_start = [0.0] * total  # RECV gid -> when its message started moving

    def post_p2p(g: int, t: float) -> None:
        post[g] = t
        other = partner[g]
        if kind[g] == K_SEND:  # eager: moves as soon as the link is free
            lid = link_of[g]
            s = link_free[lid]
            if s < t:
                s = t
            e = s + dur[g]
            w = nic[g]
            if w > 0.0:  # sender's port out, receiver's port in: wait for their backlog
                co = cls[other]
                b = max(s, tx_free[cls[g]], rx_free[co])
                e += b - s
                tx_free[cls[g]] = rx_free[co] = b + w
            link_free[lid] = e
            start[g] = s
            push(events, (e, g))
            arrival[other] = e
            xfer_start[other] = s
            cg = cls[g]
            if comm_until[cg] < e:
                comm_until[cg] = e
                if span_on[cg]:
                    retime(cg, t)
            if post[other] >= 0:
                _finish_recv(other, t)
        elif arrival[g] >= 0:
            _finish_recv(g, t)

    def _finish_recv(r: int, t: float) -> None:
        p, a = post[r], arrival[r]
        s = xfer_start[r] if xfer_start[r] > p else p
        e = a if a > p else p
        start[r] = s if s < e else e
        push(events, (e, r))
        cr = cls[r]
        if comm_until[cr] < e:
            comm_until[cr] = e
            if span_on[cr]:
                retime(cr, t)

    dirty: list[int] = []
    # initial ready nodes
    for g in range(total):
        if indeg[g] == 0:
            k = kind[g]
            if k == K_COMP:
                ready_heaps[cls[g]].append(g)  # ascending gids: already a heap
            elif k == K_COLL:
                is_ready[g] = 1
            else:
                post_p2p(g, 0.0)
    for sid in range(nstreams):
        q = queues[sid]
        if q and is_ready[q[0]]:
            start_coll(q[0], 0.0)
    dirty = list(range(nclasses))
    cur_t = 0.0

    while True:
        # start compute on every idle stream touched at this time
        for c in dirty:
            if comp_busy[c]:
                continue
            h = ready_heaps[c]
            if not h:
                continue
            g = pop(h)
            m = span_end[g]
            # a span (another ready COMP node would run in its first collective's gap: not now)
            if m and not h and (m := open_span(c, g, m)) > g + 1:
                t = time_span(g, m, cur_t, comm_until[c])
                span_on[c] = comp_busy[c] = True
                running[c] = g
                run_end[c] = t
                span_stop[c] = m
                is_tail[m - 1] = 1
                push(events, (t, m - 1))
                continue
            t = time_span(g, g + 1, cur_t, comm_until[c])  # one node: slowed while communication is in flight
            comp_busy[c] = True
            running[c] = g
            run_end[c] = t
            push(events, (t, g))
        if not events:
            break
        cur_t = events[0][0]
        dirty = []
        while events and events[0][0] == cur_t:
            _, g = pop(events)
            if is_tail[g]:  # a span ends (1: running, 2: ended)
                if is_tail[g] == 2 or end[g] != cur_t:  # stale: the span was timed again (retime), to a
                    continue  # later end or, by float rounding of the slowdown, an earlier one
                c = cls[g]
                is_tail[g] = 2
                span_on[c] = comp_busy[c] = False
                dirty.append(c)
                hs = held[c]
                for sid in hs:
                    sbusy[sid] = holder[sid] = False
                for sid in hs:
                    q = queues[sid]
                    if qpos[sid] < len(q) and is_ready[q[qpos[sid]]]:
                        start_coll(q[qpos[sid]], cur_t)
                hs.clear()
                k = -1
            else:
                end[g] = cur_t
                k = kind[g]
                c = cls[g]
            if k == K_COMP:
                comp_busy[c] = False
                dirty.append(c)
            elif k == K_COLL:
                sid = stream_of[g]
                sbusy[sid] = False
                qpos[sid] += 1
                q = queues[sid]
                if qpos[sid] < len(q) and is_ready[q[qpos[sid]]]:
                    s = q[qpos[sid]]
                    d = solo[s]
                    if d >= 0.0:  # start_coll inlined for a one-class collective without port backlog
                        sbusy[sid] = True
                        post[s] = start[s] = cur_t
                        e = cur_t + d
                        push(events, (e, s))
                        if comm_until[c] < e:
                            comm_until[c] = e
                            if span_on[c]:
                                retime(c, cur_t)
                    else:
                        start_coll(s, cur_t)
            a0, a1 = sptr[g], sptr[g + 1]
            if a0 == a1:
                continue
            for s in sidx[a0:a1]:
                n = indeg[s] - 1
                indeg[s] = n
                if n:
                    continue
                k = kind[s]
                if k == K_COMP:
                    cs = cls[s]
                    if comp_busy[cs] and run_end[cs] > cur_t and (span_on[cs] or s < running[cs] and multi[running[cs]]):
                        return None
                    push(ready_heaps[cs], s)
                    dirty.append(cs)
                elif k == K_COLL:
                    is_ready[s] = 1
                    sid = stream_of[s]
                    if holder[sid]:  # unmerged, it could start in the span holding its stream
                        return None
                    if not sbusy[sid] and queues[sid][qpos[sid]] == s:
                        d = solo[s]
                        if d >= 0.0:  # as above
                            sbusy[sid] = True
                            post[s] = start[s] = cur_t
                            e = cur_t + d
                            push(events, (e, s))
                            cs = cls[s]
                            if comm_until[cs] < e:
                                comm_until[cs] = e
                                if span_on[cs]:
                                    retime(cs, cur_t)
                        else:
                            start_coll(s, cur_t)
                else:
                    post_p2p(s, cur_t)
    return start, end, post
