"""Closed-form pre-screen: step time, MFU and peak memory of thousands of plans in one numpy pass.

Why: the full simulation takes about a second per plan; a search space of training layouts has
10^4-10^6 points. The screen ranks them from the *same* compiled cost expressions the lowering
uses (:meth:`Graph.op_costs`, evaluated once per op over an array of candidates), the simulator's
own roofline (:class:`tensorstage.sim.compute.ComputeModel`) and collective costs
(:mod:`tensorstage.sim.collectives`, once per distinct message size and group shape), assembled
with the textbook schedule formulas. It is not a second simulator: it drops what only the event
simulation sees (overlap slowdown, per-bucket timing, stage imbalance beyond the end stages, the
GEMM shape model), so it is used to *rank and prune*, and the survivors are simulated in full.

Terms per candidate (all per rank of the busiest pipeline stage, one micro-batch unless said):

* compute: every op of a layer at ``b = micro_batch``, ``s = seq / cp``, TP dims divided by ``tp``
  (attention cores at ``s = seq`` divided by ``cp``); an op whose cost does not shrink with TP is
  replicated, divided by ``tp`` only under sequence parallelism; time per op is the roofline
  ``max(flops / rate(op), bytes / HBM) + launch``;
* TP communication (Shoeybi et al. 2019; Korthikanti et al. 2022 sec. 4.2, ``F-TP-COMM``): 2
  all-reduces of ``b s h`` activations forward and 2 backward per layer (+2 under full
  recompute), each a reduce-scatter + all-gather pair under SP;
* pipeline (``F-PP-BUBBLE``, Qi et al. 2024): ``m (F+B+W) + (p-1)(F+B+W)`` for GPipe/1F1B,
  ``(p-1)/v`` for interleaved, ``(p-1)(F+B-W)`` for ZB-H1, plus the boundary sends on the critical path;
* data parallelism: the stage's gradients all-reduced (or reduce-scattered + all-gathered under
  ZeRO-1/2) over ``dp * cp``, hidden behind the last micro-batch's backward when overlapped;
  ZeRO-3 gathers the parameters twice per micro-batch, exposed where that outlasts the
  micro-batch's compute;
* optimizer step on the local shard; memory: model state per ZeRO stage + activations of the
  micro-batches in flight on stage 0 (1F1B: ``min(p, m)``; interleaved: Megatron's warm-up count);
* MoE: routed-expert parameters split over ``ep x expert TP`` (expert TP = ``tp``, or 1 folded),
  their gradients reduced and their optimizer state sharded over ``edp``; per MoE layer and
  micro-batch four all-to-alls (dispatch and combine, forward and backward; six under full
  recompute) of the rank's routed tokens over the EP group.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorstage.explore.evaluate import metrics_from
from tensorstage.parallel.plan import DTYPE_BYTES, ParallelPlan

#: Plan fields the screen reads, with the plan's own defaults for the ones a space leaves out.
SCREEN_FIELDS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "micro_batch", "global_batch", "seq", "sp", "zero",
                 "schedule", "recompute", "dtype", "overlap_grad_reduce", "overlap_param_gather",
                 "fsdp_reshard_after_forward", "fsdp_prefetch",
                 # graph conventions (None: the graph options' defaults), as the full simulation builds them
                 "attention_impl", "attention_flops", "dropout", "megatron_fusions")
#: Plan fields that select the graph the screen costs (one graph per distinct combination).
GRAPH_FIELDS = ("recompute", "dtype", "attention_impl", "attention_flops", "dropout", "megatron_fusions")


def plan_defaults() -> dict[str, Any]:
    return {k: ParallelPlan.model_fields[k].default for k in SCREEN_FIELDS}


@functools.lru_cache(maxsize=16)
def _graph(model: str, key: tuple[Any, ...]) -> Any:
    """The graph of ``model`` under the plan fields :data:`GRAPH_FIELDS` (``key``, in that order)."""
    from tensorstage.graph import build_graph
    from tensorstage.lower import graph_options
    from tensorstage.model import resolve_model

    plan = ParallelPlan(**dict(zip(GRAPH_FIELDS, key, strict=True)))
    opts = graph_options(plan)
    return build_graph(resolve_model(model), opts.phase, opts)


def _coll(kind: str, nbytes: np.ndarray, stride: np.ndarray, size: np.ndarray, fabric: Any,
          route: tuple[int, int, int] | None = None) -> np.ndarray:
    """Collective time for every candidate, computed once per distinct (bytes, stride, size)
    (``route``: MoE token all-to-alls under group-limited routing, as the full simulation)."""
    from tensorstage.sim.collectives import (
        all_gather_s,
        all_reduce_s,
        all_to_all_s,
        members_per_domain,
        reduce_scatter_s,
    )

    fn = {"ar": all_reduce_s, "rs": reduce_scatter_s, "ag": all_gather_s,
          "a2a": lambda b, m, f: all_to_all_s(b, m, f, route)}[kind]
    keys = np.stack([nbytes, stride, size], axis=1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    vals = np.zeros(len(uniq))
    for i, (b, st, sz) in enumerate(uniq):
        if sz > 1 and b > 0:
            members = members_per_domain([(int(st), int(sz))], fabric)
            vals[i] = fn(float(b) if kind != "ag" else float(b) / sz, members, fabric)[0]
    return vals[inv.reshape(-1)]


def _p2p(nbytes: np.ndarray, stride: np.ndarray, fabric: Any) -> np.ndarray:
    from tensorstage.sim.collectives import p2p_time_s

    doms = fabric.domain_sizes()
    tier = np.zeros(len(stride), dtype=np.int64)
    for i in range(len(doms) - 1):
        tier = np.where(stride >= doms[i], i + 1, tier)
    out = np.zeros(len(nbytes))
    for t in np.unique(tier):
        sel = tier == t
        out[sel] = [p2p_time_s(float(b), int(t), fabric) for b in nbytes[sel]]
    return out


def _expert_params(graph: Any, block: Any) -> float:
    """Routed-expert parameters of one layer block (weights with a leading ``e`` dim)."""
    from tensorstage.lower.op_roles import is_expert_weight

    return float(sum(float(graph.evaluate(t.numel)) for t in block.weights if is_expert_weight(t)))


class _BlockCost:
    """Per-candidate per-category times of one block (one instance, one micro-batch)."""

    def __init__(self, graph: Any, name: str, cols: Mapping[str, np.ndarray], cm: Any) -> None:
        from tensorstage.lower.blocks import TP_SYMBOLS
        from tensorstage.sim.compute import ATTENTION_OPS

        tp, cp, ep = cols["tp"], cols["cp"], cols["ep"]
        base = {"b": cols["micro_batch"].astype(float), "s": cols["seq"] / cp, "c": cols["seq"] / cp}
        base["v"] = np.ceil(graph.bindings["v"] / (128 * tp)) * 128 * tp  # Megatron's padded vocabulary
        base["e"] = graph.bindings["e"] / ep
        loc = dict(base)
        for s in TP_SYMBOLS:
            loc[s] = graph.bindings[s] / tp
        # MoE parallel folding (etp 1): experts whole on every rank, EP over tp*cp*dp
        loc["fe"] = graph.bindings["fe"] / np.where(cols["etp"] == 1, 1, tp)
        loc["v"] = base["v"] / tp
        ops = graph.blocks()[name].all_ops()
        L = graph.op_costs(name, loc)
        G = graph.op_costs(name, base)
        total_l = L["flops"] + L["vector_flops"] + L["bytes_read"] + L["bytes_written"]
        total_g = G["flops"] + G["vector_flops"] + G["bytes_read"] + G["bytes_written"]
        replicated = np.isclose(total_l, total_g) & (tp > 1)[None, :]
        shrink = np.where(replicated & cols["sp"].astype(bool)[None, :], 1.0 / tp[None, :], 1.0)
        core = np.array([op.kind in ATTENTION_OPS for op in ops])
        if core.any() and (cp > 1).any():  # attention cores see the whole sequence, split over cp
            C = graph.op_costs(name, {**loc, "s": cols["seq"].astype(float)})
            for q in L:
                L[q][core] = np.where(cp > 1, C[q][core] / cp, L[q][core])
        flops = (L["flops"] + L["vector_flops"]) * shrink
        nbytes = (L["bytes_read"] + L["bytes_written"]) * shrink
        from tensorstage.lower.blocks import op_label  # the lowering's op -> compute-model label

        rate = np.array([cm.rate_flops(op_label(op.kind)) for op in ops])[:, None]
        t = np.maximum(flops / rate, nbytes / cm.hbm_Bps) / _grouped_efficiency(graph, ops, loc, cm, len(tp)) \
            + cm.launch_s
        cats = np.array([op.category for op in ops])
        self.time_s = {c: t[cats == c].sum(axis=0) for c in ("fwd", "recompute", "bwd_input", "bwd_weight",
                                                           "optimizer")}
        # model FLOPs of the whole (unsharded) block instance at s = seq / cp, recompute excluded
        self.model_flops = G["flops"][np.isin(cats, ("fwd", "bwd_input", "bwd_weight"))].sum(axis=0)


def _grouped_efficiency(graph: Any, ops: list, loc: Mapping[str, Any], cm: Any, n: int) -> np.ndarray:
    """Per op and candidate, the measured grouped-GEMM efficiency the simulator divides an MoE expert
    GEMM's time by (:meth:`tensorstage.sim.kernels.KernelTables.grouped_gemm_efficiency`, keyed on
    tokens per local expert and the GEMM's width, :func:`tensorstage.sim.compute.grouped_dims`); 1 for
    every other op and without tables. The shape is read off the op's einsum as the lowering does
    (:func:`tensorstage.lower.op_roles.gemm_dims`), sized with the candidate's bindings: few tokens per expert (many local
    experts, small micro-batches) is where MoE layers run far below the dense GEMM rate. Capped at 1:
    the surface is relative to the dense table's time for the same shape, which the screen does not
    model (it charges every GEMM the device's sustained ceiling rate), so a grouped GEMM is never
    charged above that ceiling."""
    import sympy as sp

    from tensorstage.graph.dims import FREE_SYMBOLS, SYMBOLS
    from tensorstage.lower.op_roles import gemm_dims, is_expert_gemm
    from tensorstage.sim.compute import grouped_dims

    out = np.ones((len(ops), n))
    kt = getattr(cm, "kernels", None)
    if kt is None:
        return out
    bound = {**graph.bindings, **loc}
    args = [np.broadcast_to(np.asarray(bound[k], dtype=float), (n,)) for k in FREE_SYMBOLS]
    sizes: dict[str, np.ndarray] = {}

    def size(dims: set[str]) -> np.ndarray:
        v = np.ones(n)
        for d in dims:
            if d not in sizes:
                f = sp.lambdify([SYMBOLS[k] for k in FREE_SYMBOLS], graph.sizes[d], "numpy")
                sizes[d] = np.broadcast_to(np.asarray(f(*args), dtype=float), (n,))
            v = v * sizes[d]
        return np.maximum(1, np.round(v))

    for i, op in enumerate(ops):
        dims = gemm_dims(op) if is_expert_gemm(op) else None
        if dims is None:
            continue
        m, nn, k = size(dims[1]), size(dims[2]), size(dims[3])
        pairs = np.stack([m, nn, k], axis=1)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        eff = np.ones(len(uniq))
        for j, (mj, nj, kj) in enumerate(uniq):
            tokens, width = grouped_dims((1, int(mj), int(nj), int(kj)), op.category)
            e = kt.grouped_gemm_efficiency(tokens, width, cm.dtype)
            eff[j] = min(1.0, e) if e else 1.0  # the screen's flat rate is the ceiling (dense shapes too)
        out[i] = eff[inv.reshape(-1)]
    return out


def screen(model: str, system: Any, cols: Mapping[str, Any], n: int | None = None) -> dict[str, np.ndarray]:
    """Screen ``n`` candidate plans on one system; ``cols`` maps plan fields to arrays (or scalars
    broadcast to all), missing fields take the plan defaults. Returns the metrics of
    :func:`tensorstage.explore.evaluate.metrics_from` as arrays, plus ``peak_memory_bytes`` parts."""
    from tensorstage.sim.machine import machine_from_system

    n = n if n is not None else max((len(v) for v in cols.values() if np.ndim(v)), default=1)
    full = {**plan_defaults(), **cols}
    c: dict[str, np.ndarray] = {}
    for k in SCREEN_FIELDS:
        v = np.asarray(full[k])
        c[k] = np.broadcast_to(v, (n,)) if v.ndim == 0 else v
    c["etp"] = np.array([0 if v is None else int(v) for v in c["etp"]])  # None: expert TP = tp
    for k in ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "micro_batch", "global_batch", "seq", "zero"):
        c[k] = c[k].astype(np.int64)
    gb = np.where(c["global_batch"] > 0, c["global_batch"], c["dp"] * c["micro_batch"] * c["pp"])
    c["global_batch"] = gb
    out = {m: np.full(n, np.nan) for m in ("step_time_s", "mfu", "peak_memory_bytes")}
    combos = list(zip(*(c[k].tolist() for k in GRAPH_FIELDS), strict=True))
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, combo in enumerate(combos):
        groups.setdefault(combo, []).append(i)
    for combo in sorted(groups, key=repr):
        sel = np.array(groups[combo])
        machine = machine_from_system(system, combo[GRAPH_FIELDS.index("dtype")])
        part = {k: v[sel] for k, v in c.items()}
        res = _screen_group(_graph(model, combo), machine, part)
        for m in out:
            out[m][sel] = res[m]
    world = c["tp"] * c["pp"] * c["dp"] * c["cp"]
    hbm = float(system.device.hbm_bytes)
    metrics = [metrics_from(out["step_time_s"][i], out["mfu"][i], gb[i] * c["seq"][i], world[i],
                            out["peak_memory_bytes"][i], hbm) for i in range(n)]
    return {k: np.array([m[k] for m in metrics]) for k in metrics[0]} if metrics else {}


def _screen_group(graph: Any, machine: Any, c: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The terms of the module docstring for candidates sharing one graph (recompute, dtype)."""
    from tensorstage.graph.graph import state_bytes_per_param

    cm, fabric = machine.compute, machine.fabric
    tp, pp, dp, cp, vpp, mb = c["tp"], c["pp"], c["dp"], c["cp"], c["vpp"], c["micro_batch"]
    sp = c["sp"].astype(bool) & (tp > 1)
    L = graph.spec.num_layers
    m = c["global_batch"] // (dp * mb)
    kinds = graph.layer_kinds
    layer = {k: _BlockCost(graph, k, c, cm) for k in dict.fromkeys(kinds)}
    emb, head = _BlockCost(graph, "embedding", c, cm), _BlockCost(graph, "head", c, cm)

    def per_layer(cat: str) -> np.ndarray:
        return sum(layer[k].time_s[cat] * kinds.count(k) for k in layer) / L

    act_b = DTYPE_BYTES[str(c["dtype"][0])]
    msg = mb * c["seq"] / cp * graph.spec.hidden * act_b  # one layer's activations
    ones = np.ones_like(tp)
    tp_coll = np.where(sp, _coll("rs", msg, ones, tp, fabric) + _coll("ag", msg, ones, tp, fabric),
                       _coll("ar", msg, ones, tp, fabric))
    n_fwd_coll = 2 + np.where(c["recompute"] == "full", 2, 0)
    lps = np.where(L % (pp * vpp) == 0, L / pp, np.ceil(L / pp))  # layers on the busiest stage (uneven: ceil)
    F = lps * (per_layer("fwd") + 2 * tp_coll)
    B = lps * (per_layer("bwd_input") + per_layer("recompute") + n_fwd_coll * tp_coll)
    W = lps * per_layer("bwd_weight")
    ends = np.where(pp > 1, np.maximum(emb.time_s["fwd"] + emb.time_s["bwd_input"] + emb.time_s["bwd_weight"],
                                       head.time_s["fwd"] + head.time_s["bwd_input"] + head.time_s["bwd_weight"]),
                    emb.time_s["fwd"] + emb.time_s["bwd_input"] + emb.time_s["bwd_weight"]
                    + head.time_s["fwd"] + head.time_s["bwd_input"] + head.time_s["bwd_weight"])
    # MoE: routed experts split over ep (and expert TP: tp, or 1 when folded), reduced over edp;
    # per MoE layer and micro-batch the dispatch and combine all-to-alls of the rank's tokens, forward
    # and backward (+ forward again under full recompute)
    ep = c["ep"]
    folded = (c["etp"] == 1) & (tp > 1)
    etp = np.where(folded, 1, tp)
    moe_layers = sum(kinds.count(k) for k in layer if _expert_params(graph, graph.layers[k]))
    expert_layer = sum(_expert_params(graph, graph.layers[k]) * kinds.count(k) for k in layer) / L
    spec_moe = graph.spec.moe
    if spec_moe is not None and moe_layers:
        tokens = mb * c["seq"] / cp / np.where(sp, tp, 1)
        a2a_b = tokens * spec_moe.top_k * graph.spec.hidden * act_b
        n_a2a = 4 + np.where(c["recompute"] == "full", 2, 0)
        route = ((spec_moe.top_k, spec_moe.route_groups, spec_moe.route_topk_groups)
                 if spec_moe.route_groups else None)
        a2a = _coll("a2a", a2a_b, np.where(folded, 1, tp), ep, fabric, route) * n_a2a * moe_layers / L
    else:
        a2a = np.zeros(len(tp))
    per_mb = F + B + W + ends + lps * a2a
    sched = c["schedule"]
    # fill and drain: every other stage's time once (a pipeline of unequal stages takes m x the slowest
    # plus the sum of the rest), i.e. (L / lps - 1) busiest-stage times; pp - 1 when the split is even
    others = L / lps - 1
    bubble = np.where(sched == "interleaved", others / vpp * per_mb,
                      np.where(sched == "zb-h1", others * np.maximum(F + B - W, 0.0), others * per_mb))
    p2p_bytes = np.where(sp, msg / tp, msg)
    p2p = _p2p(p2p_bytes, tp * cp * dp, fabric) * 2 * np.where(sched == "interleaved", pp * vpp - 1, pp - 1)
    pipe = m * per_mb + bubble + p2p
    # data parallelism over dp*cp (stride tp); expert weights over edp
    sb = state_bytes_per_param(graph.options)
    params_layer = sum(float(graph.evaluate(graph.layers[k].param_count)) * kinds.count(k) for k in graph.layers) / L
    emb_p, head_p = (float(graph.evaluate(b.param_count)) for b in (graph.embedding, graph.head))
    dense_rank = (lps * (params_layer - expert_layer) + np.where(pp > 1, max(emb_p, head_p), emb_p + head_p)) / tp
    expert_rank = lps * expert_layer / (ep * etp)
    params_rank = dense_rank + expert_rank
    dpn = dp * cp
    edp = np.maximum(1, np.where(folded, tp, 1) * dpn // ep)
    zero = c["zero"]

    def reduce(kind_z: str, kind_0: str, nbytes: np.ndarray) -> np.ndarray:
        dense = dense_rank * nbytes / np.maximum(params_rank, 1)
        expert = expert_rank * nbytes / np.maximum(params_rank, 1)
        e_stride = np.where(folded, ep, tp * ep)
        return (np.where(zero >= 1, _coll(kind_z, dense, tp, dpn, fabric), _coll(kind_0, dense, tp, dpn, fabric))
                + np.where(zero >= 1, _coll(kind_z, expert, e_stride, edp, fabric),
                           _coll(kind_0, expert, e_stride, edp, fabric)))

    grad_bytes = params_rank * sb["grad"]
    red = reduce("rs", "ar", grad_bytes)
    gather = np.where(zero >= 1, reduce("ag", "ag", params_rank * sb["param"]), 0.0)
    overlap = c["overlap_grad_reduce"].astype(bool)
    last_bwd = B + W
    dp_exposed = np.where(overlap, np.maximum(red - last_bwd, 0.1 * red), red)
    # sharded gradients with accumulation reduce after every micro-batch (ZeRO-2; ZeRO-3 without
    # pipelining: lower/dataparallel.py reduces_every_microbatch, vectorized): m reductions on the DP
    # stream, each under the compute that follows its backward
    every_mb = ((zero == 2) | ((zero == 3) & (pp == 1))) & (m > 1)
    dp_exposed = np.where(every_mb, np.where(overlap, np.maximum(m * red - (m - 1) * (F + B + W) - last_bwd,
                                                                  0.1 * red), m * red), dp_exposed)
    gather_exposed = np.where(c["overlap_param_gather"].astype(bool), 0.0, gather)
    # the optimizer step and ZeRO shards: dense state over dp*cp, expert state over edp
    e_share = expert_rank / np.maximum(params_rank, 1)
    eff_shard = np.where(zero >= 1, 1.0 / ((1 - e_share) / dpn + e_share / edp), 1)
    opt = (lps * per_layer("optimizer") + head.time_s["optimizer"]) / eff_shard
    # ZeRO-3 / FSDP: the stage's parameters are gathered for every micro-batch's forward and
    # backward (only what outlasts that micro-batch's compute shows, plus the first gather); the
    # gradients are reduce-scattered after the last backward, like the ZeRO-1/2 buckets
    ag_mb = _coll("ag", params_rank * sb["param"], tp, dpn, fabric)
    # per micro-batch, a gather overlaps only the pass it feeds (fsdp_prefetch issues the next layer's
    # during this one's compute): the backward's gather hides under the backward, the forward's under
    # the forward. Which passes gather (lower/dp_emission.py, torch FSDP2): each gathers what the other
    # resharded; torch pipelining keeps a unit after a backward (until the chunk's last), so with pp > 1
    # only the backward gathers; reshard_after_forward false: the forward never reshards
    no_fwd_reshard = c["fsdp_reshard_after_forward"] == "false"
    fwd_gather = np.where(pp > 1, 0.0, np.maximum(ag_mb - F, 0.0))
    bwd_gather = np.where(no_fwd_reshard, 0.0, np.maximum(ag_mb - (B + W), 0.0))
    fsdp = m * (fwd_gather + bwd_gather) + ag_mb + dp_exposed
    step = pipe + np.where(zero >= 3, fsdp, dp_exposed + gather_exposed) + opt
    # memory
    state = params_rank * (sb["param"] + np.where(zero >= 2, sb["grad"] / eff_shard, sb["grad"])
                           + (sb["master"] + sb["optimizer_states"] + sb["grad_copy"]) / eff_shard)
    # ZeRO-3 reducing once per step (with pipelining) over several micro-batches accumulates unsharded
    # gradients (lower/dataparallel.py static_bytes)
    grad3 = np.where((pp > 1) & (m > 1), params_rank * sb["grad"], params_rank * sb["grad"] / eff_shard)
    state = np.where(zero >= 3, params_rank * (sum(sb.values()) - sb["grad"]) / eff_shard + grad3, state)
    act = _activation_bytes(graph, c, sp)
    inflight_layers = np.where(
        sched == "interleaved", np.minimum(m * vpp, 2 * (pp - 1) + (vpp - 1) * pp + 1) * lps / vpp,
        np.where(sched == "gpipe", m * lps, np.minimum(pp, m) * lps))
    # the head's saved activations (the vocabulary-parallel logits: fp32 under the loss, the largest
    # single tensor of a step with a big vocabulary) live on the last stage, for the micro-batches in
    # flight there: all of them on one stage (or under GPipe), one under 1F1B / interleaving
    head_act = _activation_bytes(graph, c, sp, "head")
    last_inflight = np.where((pp == 1) | (sched == "gpipe"), inflight_layers / lps, 1.0)
    # ZeRO-3 / FSDP2 (lower/dp_emission.py): gathered parameters live until their unit reshards. With
    # pipelining a unit stays unsharded from its first use to the chunk's last backward (torch's
    # pipelining reshards after the last backward only), so at the peak the whole stage is gathered;
    # without, the layer units in use and prefetched plus the root (embedding and head, which the
    # default reshard_after_forward=None keeps unsharded after the forward), or everything with
    # reshard_after_forward false
    layer_rank = (params_layer - expert_layer) / tp + expert_layer / (ep * etp)
    root_rank = (emb_p + head_p) / tp
    whole = (pp > 1) | (c["fsdp_reshard_after_forward"] == "false")
    in_use = (1 + c["fsdp_prefetch"]) * layer_rank + np.where(c["fsdp_reshard_after_forward"] == "true", 0.0,
                                                              root_rank)
    # (checked against the simulator on the 38 plans of bench/data/explore_full_sample.json with at most
    # 48 micro-batches: median error +0.4 %, mean |error| 6.6 %, -11 % .. +38 %; before: ZeRO-3 pipelines
    # down to -94 %, mean |error| 26 %; taking the larger of gathered and live instead of the sum: 11 %)
    gathered = np.where(zero >= 3, sb["param"] * np.where(whole, params_rank, in_use), 0.0)
    live = np.where(pp > 1, np.maximum(act * inflight_layers,
                                       act * np.where(sched == "gpipe", inflight_layers, lps)
                                       + head_act * last_inflight),
                    act * inflight_layers + head_act * last_inflight)
    peak = state + gathered + live
    model_flops = sum(layer[k].model_flops * kinds.count(k) for k in layer) + emb.model_flops + head.model_flops
    world = tp * pp * dp * cp
    mfu = model_flops * m * dp * cp / (step * world * cm.peak_flops)
    return {"step_time_s": step, "mfu": mfu, "peak_memory_bytes": peak}


def _activation_bytes(graph: Any, c: Mapping[str, np.ndarray], sp: np.ndarray, block: str | None = None
                      ) -> np.ndarray:
    """Saved activation bytes of one layer (or of ``block``, e.g. ``"head"``) per micro-batch on one
    rank: the part of the graph's ``activation_bytes`` that shrinks with TP is divided by ``tp``,
    the rest only under SP."""
    from tensorstage.lower.blocks import TP_SYMBOLS

    tp = c["tp"].astype(float)
    b = {"b": c["micro_batch"].astype(float), "s": c["seq"] / c["cp"]}
    counts = {block: 1} if block else {k: graph.layer_kinds.count(k) for k in graph.layers}

    def mean_layer(bindings: dict[str, Any]) -> np.ndarray:
        per = graph.costs(bindings).per_block
        return sum(per[k]["activation_bytes"] * n for k, n in counts.items()) / sum(counts.values())

    glob = mean_layer(b)
    loc = mean_layer({**b, **{s: graph.bindings[s] / tp for s in TP_SYMBOLS}})
    return np.where(sp, glob / tp, loc)
