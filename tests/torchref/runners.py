"""Per-rank scenarios (DDP, FSDP2, TP/TP+SP, PP, EP, hand-issued) and their public ``run_*`` entry points.

Each scenario is ``fn(cfg, recorder, rank, world_size) -> info``; it labels records with
``recorder.phase`` (``init``, ``step<i>.fwd``, ``step<i>.bwd``, ...) and returns JSON-able facts
(parameter sizes, bucket layout, schedule order) that tests compare with closed forms.
Every ``run_*(cfg)`` spawns its own world; :func:`run_many` groups several in one world.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .models import Block, Experts, MLPStack, TinyLM
from .recorder import CommRecorder
from .world import run_world, scenario

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(cfg: dict[str, Any]) -> torch.dtype:
    return _DTYPES[cfg.get("dtype", "fp32")]


def _params_info(module: nn.Module) -> list[dict[str, Any]]:
    """Name, shape and bytes of each parameter in registration order (local, as the module holds them)."""
    out = []
    for name, p in module.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out.append({"name": name, "shape": list(p.shape), "local_shape": list(local.shape),
                    "bytes": p.numel() * p.element_size()})
    return out


# ----------------------------------------------------------------------------------------------- manual
@scenario("manual")
def manual(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """Hand-issued collectives of known sizes, one of each API, to prove what the recorder sees."""
    import torch.distributed._functional_collectives as funcol

    n = int(cfg.get("numel", 12))
    t = torch.ones(n)
    rec.phase = "all_reduce"
    dist.all_reduce(t)
    rec.phase = "all_gather_into_tensor"
    dist.all_gather_into_tensor(torch.empty(n * ws), t)
    rec.phase = "all_gather_list"
    dist.all_gather([torch.empty(n) for _ in range(ws)], t)
    rec.phase = "reduce_scatter_tensor"
    dist.reduce_scatter_tensor(torch.empty(n), torch.ones(n * ws))
    rec.phase = "all_to_all_single"
    dist.all_to_all_single(torch.empty(n * ws), torch.ones(n * ws))
    rec.phase = "broadcast"
    dist.broadcast(t, src=ws - 1)
    rec.phase = "p2p"
    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    ops = [dist.P2POp(dist.isend, t, nxt), dist.P2POp(dist.irecv, torch.empty(n), prv)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    rec.phase = "funcol_all_reduce"
    funcol.all_reduce(torch.ones(n, dtype=torch.float64), "sum", dist.group.WORLD).wait()
    sub = dist.new_group([0, 1])  # every rank must call new_group
    rec.phase = "subgroup_all_reduce"
    if rank in (0, 1):
        dist.all_reduce(torch.ones(n, dtype=torch.bfloat16), group=sub)
    return {"numel": n}


# ------------------------------------------------------------------------------------------------ DDP
@scenario("ddp")
def ddp(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """DistributedDataParallel over an MLP stack; ``steps`` iterations so bucket rebuilding shows.

    ``accum=k`` runs k microbatches per step with ``no_sync()`` on all but the last (phases
    ``step<i>.mb<j>.fwd/bwd``).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    h, layers, batch = int(cfg.get("hidden", 32)), int(cfg.get("layers", 2)), int(cfg.get("batch", 4))
    model = MLPStack(h, int(cfg.get("ffn", 2 * h)), layers).to(_dtype(cfg))
    rec.phase = "init"
    kwargs: dict[str, Any] = {}
    if cfg.get("bucket_cap_mb") is not None:
        kwargs["bucket_cap_mb"] = float(cfg["bucket_cap_mb"])
    for flag in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view"):
        if flag in cfg:
            kwargs[flag] = bool(cfg[flag])
    model = DDP(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    accum = int(cfg.get("accum", 1))  # microbatches per step; all but the last run under no_sync()
    for step in range(int(cfg.get("steps", 2))):
        for mb in range(accum):
            x = torch.randn(batch, h, dtype=_dtype(cfg))
            sync = mb == accum - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                tag = f"step{step}" if accum == 1 else f"step{step}.mb{mb}"
                rec.phase = f"{tag}.fwd"
                loss = model(x).float().pow(2).sum()
                rec.phase = f"{tag}.bwd"
                loss.backward()
        rec.phase = f"step{step}.optim"
        opt.step()
        opt.zero_grad()
    log = model._get_ddp_logging_data()
    return {"params": _params_info(model.module),
            "bucket_sizes": log.get("bucket_sizes"), "rebuilt_bucket_sizes": log.get("rebuilt_bucket_sizes"),
            "bucket_cap_bytes": model.bucket_bytes_cap}


# ---------------------------------------------------------------------------------------------- FSDP2
@scenario("fsdp2")
def fsdp2(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """``fully_shard`` on each block, then on the root (which owns the head), over a 1-D CPU mesh.

    ``hsdp_replicate=R`` uses a 2-D (R, ws/R) mesh (HSDP); ``param_dtype``/``reduce_dtype`` set a
    ``MixedPrecisionPolicy`` (e.g. ``"bf16"``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    h, layers, batch = int(cfg.get("hidden", 32)), int(cfg.get("layers", 2)), int(cfg.get("batch", 4))
    model = MLPStack(h, int(cfg.get("ffn", 2 * h)), layers, vocab=int(cfg.get("vocab", 10))).to(_dtype(cfg))
    unsharded = _params_info(model)
    rep = int(cfg.get("hsdp_replicate", 1))  # >1: HSDP, shard within groups of ws/rep, replicate across
    if rep > 1:
        mesh = init_device_mesh("cpu", (rep, ws // rep), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (ws,))
    mp_policy = MixedPrecisionPolicy(param_dtype=_DTYPES.get(cfg.get("param_dtype", "")),
                                     reduce_dtype=_DTYPES.get(cfg.get("reduce_dtype", "")))
    raf = bool(cfg.get("reshard_after_forward", True))
    rec.phase = "init"
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=raf, mp_policy=mp_policy)
    root_raf = cfg.get("root_reshard_after_forward", raf)  # None = torch's default heuristic
    fully_shard(model, mesh=mesh, reshard_after_forward=None if root_raf is None else bool(root_raf),
                mp_policy=mp_policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(int(cfg.get("steps", 1))):
        # the input requires grad as an embedding's output would: otherwise the first block's
        # post-backward (its reduce-scatter) waits for FSDP's final callback, after the root's
        x = torch.randn(batch, h, dtype=_dtype(cfg), requires_grad=True)
        rec.phase = f"step{step}.fwd"
        loss = model(x).float().pow(2).sum()
        rec.phase = f"step{step}.bwd"
        loss.backward()
        rec.phase = f"step{step}.optim"
        opt.step()
        opt.zero_grad()
    return {"params": unsharded, "sharded_params": _params_info(model)}


@scenario("fsdp2_tp")
def fsdp2_tp(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """2-D torchtitan layout: TP (optionally SP) inside each ``tp`` group, FSDP2 over the ``dp`` axis.

    Mesh is (dp, tp) = (ws/tp, tp) with tp innermost, so TP groups are consecutive ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    h, heads, ffn = int(cfg.get("hidden", 32)), int(cfg.get("heads", 4)), int(cfg.get("ffn", 64))
    b, s, sp, tpn = int(cfg.get("batch", 2)), int(cfg.get("seq", 8)), bool(cfg.get("sp", False)), int(cfg["tp"])
    mesh = init_device_mesh("cpu", (ws // tpn, tpn), mesh_dim_names=("dp", "tp"))
    block = Block(h, heads, ffn).to(_dtype(cfg))
    rec.phase = "init"
    parallelize_module(block, mesh["tp"], _block_plan(sp, True))
    fully_shard(block, mesh=mesh["dp"], reshard_after_forward=bool(cfg.get("reshard_after_forward", True)))
    x = torch.randn(b, s, h, dtype=_dtype(cfg))
    if sp:
        x = x.chunk(tpn, dim=1)[mesh["tp"].get_local_rank()].contiguous()
    rec.phase = "fwd"
    out = block(x)
    out = out.to_local() if hasattr(out, "to_local") else out
    rec.phase = "bwd"
    out.float().pow(2).sum().backward()
    return {"params": _params_info(block)}


# ------------------------------------------------------------------------------------------------- TP
def _block_plan(sp: bool, prepare_input: bool, prefix: str = "") -> dict[str, Any]:
    """torchtitan-style TP plan of one Block; ``sp`` adds SequenceParallel norms and seq-sharded I/O.

    ``prepare_input`` (no SP) makes each sublayer's input one DTensor so the q/k/v input grads are summed
    before a single backward all-reduce, as Megatron does.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    if sp:
        plan: dict[str, Any] = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
    else:
        plan = {"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        if prepare_input:
            for mod in ("attention", "feed_forward"):
                plan[mod] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
    plan.update({f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")})
    plan["feed_forward.w1"] = ColwiseParallel()
    return {prefix + k: v for k, v in plan.items()}


@scenario("tp")
def tp(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """One transformer block under DTensor TP (Megatron attention+MLP); ``sp=True`` adds SequenceParallel.

    Without SP the block input is a replicated (b, s, h) tensor; with SP each rank holds its
    (b, s/tp, h) sequence shard, as in torchtitan's ``apply_tp``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    h, heads, ffn = int(cfg.get("hidden", 32)), int(cfg.get("heads", 4)), int(cfg.get("ffn", 64))
    b, s, sp = int(cfg.get("batch", 2)), int(cfg.get("seq", 8)), bool(cfg.get("sp", False))
    block = Block(h, heads, ffn).to(_dtype(cfg))
    mesh = init_device_mesh("cpu", (ws,))
    plan = _block_plan(sp, bool(cfg.get("prepare_input", False)))
    rec.phase = "init"
    parallelize_module(block, mesh, plan)
    x = torch.randn(b, s, h, dtype=_dtype(cfg))
    if sp:
        x = x.chunk(ws, dim=1)[rank].contiguous()
    x.requires_grad_(True)
    rec.phase = "fwd"
    out = block(x)
    out = out.to_local() if hasattr(out, "to_local") else out
    rec.phase = "bwd"
    out.float().pow(2).sum().backward()
    grads = {n: (p.grad.placements.__repr__() if hasattr(p.grad, "placements") else "local")
             for n, p in block.named_parameters() if p.grad is not None}
    rec.phase = "optim"  # SP norm grads are Partial: the optimizer's DTensor ops all-reduce them here
    torch.optim.SGD(block.parameters(), lr=0.01, foreach=False).step()
    return {"params": _params_info(block), "out_shape": list(out.shape), "grad_placements": grads}


@scenario("tp_lm")
def tp_lm(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """TinyLM under TP: vocab-parallel embedding (row-wise), TP blocks, vocab-parallel LM head (column-wise)
    and ``loss_parallel`` cross-entropy on vocab-sharded logits; ``sp=True`` as torchtitan.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        loss_parallel,
        parallelize_module,
    )

    h, heads, ffn = int(cfg.get("hidden", 32)), int(cfg.get("heads", 4)), int(cfg.get("ffn", 64))
    b, s, sp = int(cfg.get("batch", 2)), int(cfg.get("seq", 8)), bool(cfg.get("sp", False))
    vocab, layers = int(cfg.get("vocab", 64)), int(cfg.get("layers", 1))
    model = TinyLM(vocab, h, heads, ffn, layers).to(_dtype(cfg))
    mesh = init_device_mesh("cpu", (ws,))
    if sp:
        plan: dict[str, Any] = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        }
    else:
        plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
                "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(layers):
        plan.update(_block_plan(sp, bool(cfg.get("prepare_input", False)), prefix=f"layers.{i}."))
    rec.phase = "init"
    parallelize_module(model, mesh, plan)
    tokens = torch.randint(vocab, (b, s))
    labels = torch.randint(vocab, (b, s))
    rec.phase = "fwd"
    logits = model(tokens)
    with loss_parallel():
        rec.phase = "loss"
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
        rec.phase = "bwd"
        loss.backward()
    return {"params": _params_info(model), "logits_placements": repr(logits.placements)}


# ------------------------------------------------------------------------------------------------- PP
_SINGLE = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
_MULTI = {"interleaved1f1b": "ScheduleInterleaved1F1B", "looped_bfs": "ScheduleLoopedBFS",
          "zb_interleaved": "ScheduleInterleavedZeroBubble"}


@scenario("pp")
def pp(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """Manual ``PipelineStage`` s under a torch schedule, optionally with data parallelism.

    ``dp=D`` (with ``dp_mode`` ddp|fsdp) makes a (pp, dp) mesh with dp innermost (Megatron order:
    rank = pp_rank*D + dp_rank) and wraps each stage module in DDP / ``fully_shard`` over its dp group.

    ``schedule`` gpipe|1f1b use one stage per rank; interleaved1f1b|looped_bfs|zb_interleaved use
    ``virtual_stages`` stages per rank (stage ``rank + i*ws``, Megatron's looped placement).
    Shapes are given up front (``input_args`` etc.) so no shape-inference messages are sent.
    Returns torch's planned ``pipeline_order`` and the order the stages actually ran chunks in
    (``F``/``B`` full backward/``I`` input-grad only/``W`` weight-grad), with ``comm_seq``
    (records issued before the action) to interleave comm and compute.
    """
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    h, mbs = int(cfg.get("hidden", 16)), int(cfg.get("microbatches", 4))
    mb_size, lps = int(cfg.get("microbatch_size", 2)), int(cfg.get("layers_per_stage", 2))
    name = cfg.get("schedule", "1f1b")
    if name not in _SINGLE and name not in _MULTI:
        raise ValueError(f"schedule={name!r}; allowed: {sorted(_SINGLE) + sorted(_MULTI)}")
    v = 1 if name in _SINGLE else int(cfg.get("virtual_stages", 2))
    dp, dp_mode = int(cfg.get("dp", 1)), cfg.get("dp_mode", "ddp")
    pp_size, pp_rank = ws // dp, rank // dp
    pp_group = dp_group = dp_mesh = None
    if dp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (pp_size, dp), mesh_dim_names=("pp", "dp"))
        pp_group, dp_group, dp_mesh = mesh.get_group("pp"), mesh.get_group("dp"), mesh["dp"]
    n_stages = pp_size * v
    dt = _dtype(cfg)
    example = torch.empty(mb_size, h, dtype=dt)
    actions: list[dict[str, Any]] = []
    stages, params = [], []
    rec.phase = "init"
    for i in range(v):
        idx = pp_rank + i * pp_size
        torch.manual_seed(int(cfg.get("seed", 0)) + idx)
        module = nn.Sequential(*[nn.Sequential(nn.Linear(h, h), nn.ReLU()) for _ in range(lps)]).to(dt)
        params += _params_info(module)
        if dp > 1 and dp_mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, process_group=dp_group)
        elif dp > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in module:  # torchtitan: one unit per block, then the stage root
                fully_shard(layer, mesh=dp_mesh)
            fully_shard(module, mesh=dp_mesh)
        stage = PipelineStage(module, idx, n_stages, torch.device("cpu"), group=pp_group, input_args=(example,),
                              output_args=(example,), output_grads=(example,) if idx < n_stages - 1 else None,
                              input_grads=(example,) if idx > 0 else None)

        def wrap(kind: str, fn: Any, idx: int = idx) -> Any:
            def inner(chunk_id: int, *a: Any, **k: Any) -> Any:
                full = k.get("full_backward", True) if kind == "B" else True
                actions.append({"stage": idx, "action": kind if full else "I", "mb": int(chunk_id),
                                "comm_seq": len(rec.records)})
                return fn(chunk_id, *a, **k)
            return inner

        stage.forward_one_chunk = wrap("F", stage.forward_one_chunk)
        stage.backward_one_chunk = wrap("B", stage.backward_one_chunk)
        stage.backward_weight_one_chunk = wrap("W", stage.backward_weight_one_chunk)
        stages.append(stage)
    cls = getattr(pipelining, _SINGLE.get(name) or _MULTI[name])
    loss_fn = lambda out, tgt: (out - tgt).float().pow(2).sum()  # noqa: E731
    sched = cls(stages[0] if v == 1 and name in _SINGLE else stages, n_microbatches=mbs, loss_fn=loss_fn)
    order = getattr(sched, "pipeline_order", None)
    x = torch.randn(mbs * mb_size, h, dtype=dt)
    y = torch.randn(mbs * mb_size, h, dtype=dt)
    for step in range(int(cfg.get("steps", 1))):
        rec.phase = f"step{step}"
        if pp_rank == 0:
            sched.step(x)
        elif pp_rank == pp_size - 1:
            sched.step(target=y)
        else:
            sched.step()
    return {
        "actions": actions,
        "pipeline_order": None if order is None else
        {str(r): [None if a is None else str(a) for a in acts] for r, acts in order.items()},
        "params": params,
    }


# ------------------------------------------------------------------------------------------------- EP
@scenario("ep")
def ep(cfg: dict[str, Any], rec: CommRecorder, rank: int, ws: int) -> dict[str, Any]:
    """Tiny MoE layer: top-k router, all-to-all of token counts, token dispatch, experts, combine.

    This is the Megatron / torchtitan EP pattern written by hand: the token all-to-alls are autograd-aware
    (``all_to_all_single_autograd``), so backward issues the mirrored all-to-alls.
    """
    import torch.distributed._functional_collectives as funcol

    h, ffn, experts = int(cfg.get("hidden", 16)), int(cfg.get("ffn", 32)), int(cfg.get("experts", 4))
    topk, tokens = int(cfg.get("topk", 2)), int(cfg.get("tokens", 16))
    if experts % ws:
        raise ValueError(f"experts={experts} must be divisible by world size {ws}")
    local_e = experts // ws
    dt = _dtype(cfg)
    gate = nn.Linear(h, experts, bias=False).to(dt)  # same seed on all ranks: replicated router
    torch.manual_seed(int(cfg.get("seed", 0)) + 1000 + rank)  # distinct local experts and tokens
    local = Experts(local_e, h, ffn).to(dt)
    x = torch.randn(tokens, h, dtype=dt, requires_grad=True)
    group = dist.group.WORLD

    rec.phase = "fwd"
    weights, eids = torch.topk(torch.softmax(gate(x).float(), dim=-1), topk, dim=-1)
    flat_e = eids.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    routed = x.repeat_interleave(topk, dim=0)[order]
    counts = torch.bincount(flat_e, minlength=experts)  # tokens per global expert from this rank
    recv_counts = torch.empty_like(counts)
    rec.phase = "fwd.counts"
    dist.all_to_all_single(recv_counts, counts, group=group)  # counts for my local experts from each src
    send_splits = counts.view(ws, local_e).sum(1).tolist()
    recv_by_src = recv_counts.view(ws, local_e)
    recv_splits = recv_by_src.sum(1).tolist()
    rec.phase = "fwd.dispatch"
    got = funcol.all_to_all_single_autograd(routed, recv_splits, send_splits, group)
    got = got.wait() if hasattr(got, "wait") else got
    rec.phase = "fwd.experts"
    # regroup received rows (src-major) into expert-major runs, apply experts, undo
    src_major = [(src, e) for src in range(ws) for e in range(local_e)]
    sizes = [int(recv_by_src[src, e]) for src, e in src_major]
    pieces = list(torch.split(got, sizes, dim=0))
    perm = sorted(range(len(src_major)), key=lambda i: (src_major[i][1], src_major[i][0]))
    y_e = local(torch.cat([pieces[i] for i in perm], dim=0), recv_by_src.sum(0).tolist())
    back = list(torch.split(y_e, [sizes[i] for i in perm], dim=0))
    inv = [0] * len(perm)
    for pos, i in enumerate(perm):
        inv[i] = pos
    y_src = torch.cat([back[inv[i]] for i in range(len(src_major))], dim=0)
    rec.phase = "fwd.combine"
    ret = funcol.all_to_all_single_autograd(y_src, send_splits, recv_splits, group)
    ret = ret.wait() if hasattr(ret, "wait") else ret
    rec.phase = "fwd.tail"
    unsorted = torch.empty_like(ret).index_copy(0, order, ret)
    out = (unsorted.view(tokens, topk, h).float() * weights.unsqueeze(-1)).sum(1)
    rec.phase = "bwd"
    out.pow(2).sum().backward()
    return {"send_splits": send_splits, "recv_splits": recv_splits, "tokens": tokens, "topk": topk}


# ------------------------------------------------------------------------------------------- entry points
def _run_one(name: str, cfg: dict[str, Any], default_ws: int) -> dict[str, Any]:
    ws = int(cfg.get("world_size", default_ws))
    return run_world({name: {**cfg, "scenario": name}}, ws, cfg.get("start_method", "fork"))[name]


def run_manual(cfg: dict[str, Any]) -> dict[str, Any]:
    """Hand-issued collectives (recorder self-check). Default world size 2."""
    return _run_one("manual", cfg, 2)


def run_ddp(cfg: dict[str, Any]) -> dict[str, Any]:
    """DDP run; cfg keys: world_size, hidden, ffn, layers, batch, bucket_cap_mb, steps, dtype."""
    return _run_one("ddp", cfg, 2)


def run_fsdp2(cfg: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 run; cfg keys: world_size, hidden, ffn, layers, vocab, batch, reshard_after_forward, steps."""
    return _run_one("fsdp2", cfg, 2)


def run_tp(cfg: dict[str, Any]) -> dict[str, Any]:
    """TP (``sp=False``) or TP+SP (``sp=True``) block; cfg keys: world_size, hidden, heads, ffn, batch, seq."""
    return _run_one("tp", cfg, 2)


def run_pp(cfg: dict[str, Any]) -> dict[str, Any]:
    """PP run; cfg keys: world_size (= stages), schedule gpipe|1f1b, microbatches, microbatch_size, hidden."""
    return _run_one("pp", cfg, 2)


def run_ep(cfg: dict[str, Any]) -> dict[str, Any]:
    """EP MoE run; cfg keys: world_size, hidden, ffn, experts, topk, tokens."""
    return _run_one("ep", cfg, 2)


def run_many(jobs: dict[str, dict[str, Any]], world_size: int, start_method: str = "fork") -> dict[str, Any]:
    """Run several labelled configs (each with a ``"scenario"`` key) in one world to save spawn time."""
    return run_world(jobs, world_size, start_method)

