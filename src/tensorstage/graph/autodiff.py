"""Reverse-mode autodiff over a block's forward ops: every op kind defines its VJP here.

Why rules instead of a hand-written backward graph: every builder (dense, MoE, MLA, embeddings,
loss) gets a correct backward for free, and a new forward op needs exactly one VJP rule. The
rules emit *separate* ops for input-gradients (category ``bwd_input``) and weight-gradients
(``bwd_weight``): an einsum ``A, B -> Y`` yields ``Y, B -> A`` and ``A, Y -> B``, each with the
forward's FLOPs, so zero-bubble schedules can defer the weight half.

Gradients of a tensor used by several ops (the residual stream) are summed by an explicit
accumulation op. Weight gradients are written in the precision policy's ``grad_dtype`` (Megatron
accumulates into fp32 ``main_grad``); activation gradients in the activation dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from tensorstage.graph.builder import Builder
from tensorstage.graph.dims import dtype_bytes
from tensorstage.graph.ir import Op, Tensor

Z = sp.Integer(0)


class _Ctx:
    """Accumulates backward ops and the gradient of each tensor."""

    def __init__(self, bld: Builder, grad_dtype: str) -> None:
        self.bld = bld
        self.grad_dtype = grad_dtype
        self.ops: list[Op] = []
        self.grads: dict[int, Tensor] = {}
        self.split_built: set[int] = set()  # tensors whose gradient so far is slices from their views

    def grad_tensor(self, of: Tensor, suffix: str = "grad") -> Tensor:
        """A new gradient tensor shaped like ``of``."""
        if of.role == "weight":
            return self.bld.tensor(f"{of.name}.{suffix}", of.dims, self.grad_dtype, "weight_grad")
        return self.bld.tensor(f"{of.name}.{suffix}", of.dims, self.bld.act_dtype, "gradient")

    def emit(
        self,
        fwd: Op,
        name: str,
        kind: str,
        category: str,
        inputs: tuple[Tensor, ...],
        outputs: tuple[Tensor, ...],
        flops: sp.Expr = Z,
        vector_flops: sp.Expr = Z,
        einsum: str | None = None,
        **attrs: object,
    ) -> Op:
        op = Op(
            name,
            kind,
            category,
            inputs,
            outputs,
            flops,
            vector_flops,
            sp.Add(*(t.nbytes for t in inputs)),
            sp.Add(*(t.nbytes for t in outputs)),
            einsum,
            (),
            {**attrs},
            grad_of=fwd,
        )
        self.ops.append(op)
        return op

    def give(self, fwd: Op, x: Tensor, g: Tensor) -> None:
        """Record ``g`` as (a contribution to) the gradient of ``x``."""
        if not x.requires_grad:
            return
        prev = self.grads.get(id(x))
        if prev is None:
            self.grads[id(x)] = g
            return
        acc = self.grad_tensor(x, "grad_acc")
        cat = "bwd_weight" if x.role == "weight" else "bwd_input"
        self.emit(fwd, f"{x.name}.grad_accumulate", "add", cat, (prev, g), (acc,), vector_flops=x.numel)
        self.grads[id(x)] = acc


def _cat(t: Tensor) -> str:
    return "bwd_weight" if t.role == "weight" else "bwd_input"


def _vjp_einsum(c: _Ctx, op: Op, gy: Tensor) -> None:
    a, b = op.inputs
    y = op.outputs[0]
    lhs, rhs = op.einsum.split("->")  # type: ignore[union-attr]
    sa, sb = (x.strip() for x in lhs.split(","))
    sy = rhs.strip()
    scale = op.attrs.get("flops_scale", sp.Integer(1))
    for x, spec, pair in ((a, f"{sy}, {sb} -> {sa}", (gy, b)), (b, f"{sa}, {sy} -> {sb}", (a, gy))):
        if not x.requires_grad:
            continue
        g = c.grad_tensor(x)
        c.emit(
            op,
            f"{op.name}.grad_{'w' if x.role == 'weight' else 'x'}:{x.name}",
            "einsum",
            _cat(x),
            pair,
            (g,),
            flops=op.flops,
            einsum=spec,
            flops_scale=scale,
            wrt=x.name,
            compute_dtype=op.attrs.get("compute_dtype"),
        )
        c.give(op, x, g)
    del y


def _broadcast_grad(c: _Ctx, op: Op, x: Tensor, g_full: Tensor) -> None:
    """Gradient of a broadcast operand: reduce over the dims it lacks (bias grads)."""
    if x.dims == g_full.dims:
        c.give(op, x, g_full)
        return
    g = c.grad_tensor(x)
    c.emit(
        op,
        f"{op.name}.grad_reduce:{x.name}",
        "reduce",
        _cat(x),
        (g_full,),
        (g,),
        vector_flops=g_full.numel,
        wrt=x.name,
    )
    c.give(op, x, g)


def _vjp_add(c: _Ctx, op: Op, gy: Tensor) -> None:
    for x in op.inputs:
        if x.requires_grad:
            _broadcast_grad(c, op, x, gy)


def _vjp_mul(c: _Ctx, op: Op, gy: Tensor) -> None:
    a, b = op.inputs
    for x, other in ((a, b), (b, a)):
        if not x.requires_grad:
            continue
        g = c.bld.tensor(f"{op.name}.grad_full:{x.name}", gy.dims, c.bld.act_dtype, "gradient")
        c.emit(
            op,
            f"{op.name}.grad:{x.name}",
            "mul",
            "bwd_input",
            (gy, other),
            (g,),
            vector_flops=gy.numel,
            wrt=x.name,
        )
        _broadcast_grad(c, op, x, g)


def _vjp_pointwise(c: _Ctx, op: Op, gy: Tensor, per_elem: int = 2) -> None:
    x = op.inputs[0]
    if not x.requires_grad:
        return
    g = c.grad_tensor(x)
    c.emit(
        op,
        f"{op.name}.grad",
        op.kind,
        "bwd_input",
        (gy, *op.saved),
        (g,),
        vector_flops=per_elem * gy.numel,
        wrt=x.name,
    )
    c.give(op, x, g)


def _vjp_layout(c: _Ctx, op: Op, gy: Tensor) -> None:
    copy = op.attrs.get("copy", True)
    if op.attrs.get("fn") == "split" and not copy and len(op.inputs) == 1:
        _vjp_view_split(c, op, gy)
        return
    for x in op.inputs:
        if not x.requires_grad:
            continue
        g = c.grad_tensor(x)
        bop = c.emit(
            op,
            f"{op.name}.grad:{x.name}",
            "layout",
            "bwd_input",
            (gy,),
            (g,),
            vector_flops=gy.numel if x.numel != gy.numel else Z,
            fn=f"{op.attrs.get('fn')}_grad",
            copy=copy,
            wrt=x.name,
        )
        if not copy:
            bop.bytes_read = Z
            bop.bytes_written = Z
        c.give(op, x, g)


def _vjp_view_split(c: _Ctx, op: Op, gy: Tensor) -> None:
    """A view of part of ``x`` (q/k/v of a fused QKV output, gate/up of a fused fc1, MLA latent and
    rope parts): its gradient is the matching slice of ``x``'s gradient, written into one buffer
    as ``torch.split``'s backward (a concatenation) does: each part is read and written once; the
    parts are disjoint, so nothing is summed."""
    x = op.inputs[0]
    if not x.requires_grad:
        return
    prev = c.grads.get(id(x))
    if prev is not None and id(x) not in c.split_built:
        # ``x`` also feeds a non-view op, whose gradient is already there: sum, as any layout grad
        g = c.grad_tensor(x)
        c.emit(op, f"{op.name}.grad:{x.name}", "layout", "bwd_input", (gy,), (g,), vector_flops=gy.numel,
               fn="split_grad", wrt=x.name)
        c.give(op, x, g)
        return
    g = c.grad_tensor(x, "grad" if prev is None else "grad_acc")
    bop = c.emit(op, f"{op.name}.grad:{x.name}", "layout", "bwd_input", (gy,) if prev is None else (gy, prev),
                 (g,), vector_flops=Z, fn="split_grad", copy=True, wrt=x.name)
    # the kernel that made the part's gradient writes it into the fused buffer itself when the view
    # says so (Megatron-Core's fused SwiGLU backward emits d[gate; up] as one tensor); otherwise the
    # part is copied in, as torch.split's backward (a concatenation) does
    nbytes = Z if op.attrs.get("grad_in_place") else gy.nbytes
    bop.bytes_read = nbytes
    bop.bytes_written = nbytes
    c.grads[id(x)] = g
    c.split_built.add(id(x))


def _vjp_norm(c: _Ctx, op: Op, gy: Tensor) -> None:
    x, *params = op.inputs
    g = c.grad_tensor(x)
    c.emit(
        op,
        f"{op.name}.grad_x",
        "norm",
        "bwd_input",
        (gy, *op.saved, params[0]),
        (g,),
        vector_flops=8 * gy.numel,
        wrt=x.name,
    )
    c.give(op, x, g)
    for w in params:
        gw = c.grad_tensor(w)
        c.emit(
            op,
            f"{op.name}.grad_w:{w.name}",
            "reduce",
            "bwd_weight",
            (gy, *op.saved),
            (gw,),
            vector_flops=2 * gy.numel,
            wrt=w.name,
        )
        c.give(op, w, gw)


def _vjp_softmax(c: _Ctx, op: Op, gy: Tensor) -> None:
    x, *extra = op.inputs
    g = c.grad_tensor(x)
    c.emit(
        op,
        f"{op.name}.grad",
        "softmax",
        "bwd_input",
        (gy, op.outputs[0]),
        (g,),
        vector_flops=4 * gy.numel,
        wrt=x.name,
    )
    c.give(op, x, g)
    for w in extra:
        gw = c.grad_tensor(w)
        c.emit(
            op,
            f"{op.name}.grad_w:{w.name}",
            "reduce",
            "bwd_weight",
            (gy, op.outputs[0]),
            (gw,),
            vector_flops=2 * gy.numel,
            wrt=w.name,
        )
        c.give(op, w, gw)


def _vjp_attention(c: _Ctx, op: Op, gy: Tensor) -> None:
    q, k, v, *extra = op.inputs
    sz = c.bld.sizes
    dq, dv = sz[q.dims[-1]], sz[v.dims[-1]]
    # recompute QK^T, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    core = op.flops / (dq + dv)
    grads = tuple(c.grad_tensor(t) for t in (q, k, v))
    c.emit(
        op,
        f"{op.name}.grad",
        "attention",
        "bwd_input",
        (gy, *op.saved),
        grads,
        flops=sp.expand(core * (3 * dq + 2 * dv)),
        vector_flops=2 * op.vector_flops,
        causal=op.attrs["causal"],
        flops_scale=op.attrs["flops_scale"],
        q_heads=op.attrs["q_heads"],
        compute_dtype=op.attrs.get("compute_dtype"),
    )
    for t, g in zip((q, k, v), grads, strict=True):
        c.give(op, t, g)
    for w in extra:
        gw = c.grad_tensor(w)
        c.emit(
            op,
            f"{op.name}.grad_w:{w.name}",
            "reduce",
            "bwd_weight",
            (gy, *op.saved),
            (gw,),
            vector_flops=op.vector_flops,
            wrt=w.name,
        )
        c.give(op, w, gw)


def _vjp_gather(c: _Ctx, op: Op, gy: Tensor) -> None:
    table, ids = op.inputs
    if not table.requires_grad:
        return
    g = c.grad_tensor(table)
    bop = c.emit(
        op,
        f"{op.name}.grad_w:{table.name}",
        "scatter_add",
        "bwd_weight",
        (gy, ids),
        (g,),
        vector_flops=gy.numel,
        wrt=table.name,
    )
    bop.bytes_written = gy.numel * dtype_bytes(g.dtype)  # only the rows touched
    c.give(op, table, g)


def _vjp_cross_entropy(c: _Ctx, op: Op, gy: Tensor) -> None:
    logits = op.inputs[0]
    g = c.grad_tensor(logits)
    bop = c.emit(
        op,
        f"{op.name}.grad",
        "cross_entropy",
        "bwd_input",
        (gy, *op.saved),
        (g,),
        vector_flops=2 * logits.numel,
        wrt=logits.name,
    )
    if op.attrs.get("passes") == "megatron":  # see Builder.cross_entropy
        logp, targets = op.saved
        bop.bytes_read = gy.nbytes + 2 * logp.nbytes + targets.nbytes
        bop.bytes_written = logp.nbytes + g.nbytes
    c.give(op, logits, g)


def _vjp_glu(c: _Ctx, op: Op, gy: Tensor) -> None:
    """One fused backward kernel (reads dy and both saved inputs, writes both input gradients);
    FLOPs as the unfused mul + activation backward (4 per element). With a per-row scale (the
    routing probabilities) the same kernel also writes their gradient, a row sum of ``dy x glu``."""
    ins = op.inputs
    wrt = [x for x in ins if x.requires_grad]
    outs = tuple(c.grad_tensor(x) for x in wrt)
    per_elem = 4 if len(ins) == 2 else 6
    c.emit(op, f"{op.name}.grad", "glu", "bwd_input", (gy, *ins), outs, vector_flops=per_elem * gy.numel,
           fn=op.attrs.get("fn"))
    for x, g in zip(wrt, outs, strict=True):
        c.give(op, x, g)


def _vjp_permute(c: _Ctx, op: Op, gy: Tensor) -> None:
    """Slot-order gradients back to the tokens' ``(b s k)`` layout (a scatter by the saved index)."""
    gates = op.inputs[0]
    if not gates.requires_grad:
        return
    g = c.grad_tensor(gates)
    c.emit(op, f"{op.name}.grad", "scatter", "bwd_input", (gy, *op.saved), (g,), vector_flops=gy.numel)
    c.give(op, gates, g)


def _vjp_topk(c: _Ctx, op: Op, gy: Tensor) -> None:
    probs = op.inputs[0]
    g = c.grad_tensor(probs)
    c.emit(op, f"{op.name}.grad", "scatter", "bwd_input", (gy, *op.saved), (g,), vector_flops=gy.numel)
    c.give(op, probs, g)


def _vjp_dispatch(c: _Ctx, op: Op, gy: Tensor) -> None:
    x = op.inputs[0]
    g = c.grad_tensor(x)
    c.emit(
        op,
        f"{op.name}.grad",
        "combine",
        "bwd_input",
        (gy, *op.saved),
        (g,),
        vector_flops=gy.numel,
        **{k: v for k, v in op.attrs.items() if k in ("capacity_factor", "routing_skew")},
    )
    c.give(op, x, g)


def _vjp_combine(c: _Ctx, op: Op, gy: Tensor) -> None:
    if len(op.inputs) == 2:  # unweighted (scaled activation): the gradient is dy gathered to the slots
        ye = op.inputs[0]
        g_ye = c.grad_tensor(ye)
        c.emit(op, f"{op.name}.grad_experts", "dispatch", "bwd_input", (gy, *op.saved), (g_ye,),
               vector_flops=ye.numel)
        c.give(op, ye, g_ye)
        return
    ye, gates, _tok = op.inputs
    g_ye = c.grad_tensor(ye)
    # the expert-output gradient is gate x dy gathered to the slots: it reads dy, the slot gates and
    # the indices, not the expert outputs (those serve the gate gradient below)
    c.emit(
        op,
        f"{op.name}.grad_experts",
        "dispatch",
        "bwd_input",
        (gy, *(t for t in op.saved if t is not ye)),
        (g_ye,),
        vector_flops=ye.numel,
    )
    c.give(op, ye, g_ye)
    if gates.requires_grad:
        g_g = c.grad_tensor(gates)
        c.emit(
            op, f"{op.name}.grad_gates", "reduce", "bwd_input", (gy, ye), (g_g,), vector_flops=2 * ye.numel
        )
        c.give(op, gates, g_g)


VJP: dict[str, Callable[[_Ctx, Op, Tensor], None]] = {
    "einsum": _vjp_einsum,
    "add": _vjp_add,
    "mul": _vjp_mul,
    "unary": _vjp_pointwise,
    "glu": _vjp_glu,
    "rope": lambda c, op, gy: _vjp_pointwise(c, op, gy, 3),
    "dropout": lambda c, op, gy: _vjp_pointwise(c, op, gy, 2),
    "layout": _vjp_layout,
    "norm": _vjp_norm,
    "softmax": _vjp_softmax,
    "attention": _vjp_attention,
    "gather": _vjp_gather,
    "cross_entropy": _vjp_cross_entropy,
    "topk": _vjp_topk,
    "dispatch": _vjp_dispatch,
    "combine": _vjp_combine,
    "permute": _vjp_permute,
}


def backward(
    bld: Builder, forward: list[Op], seeds: dict[int, Tensor], grad_dtype: str
) -> tuple[list[Op], dict[int, Tensor]]:
    """Backward ops of ``forward`` given output gradients ``seeds`` (tensor id -> grad tensor).

    Returns the ops in execution order and the final gradient of every tensor (by id), from which
    the caller reads the gradient flowing out of the block's inputs.
    """
    c = _Ctx(bld, grad_dtype)
    c.grads.update(seeds)
    for op in reversed(forward):
        gy = c.grads.get(id(op.outputs[0]))
        if gy is None:
            continue
        rule = VJP.get(op.kind)
        if rule is None:
            raise NotImplementedError(f"no VJP rule for op kind {op.kind!r}")
        rule(c, op, gy)
    return c.ops, c.grads
