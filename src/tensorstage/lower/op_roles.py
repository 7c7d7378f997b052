"""What part an op or tensor plays in a block, for block lowering and its emitters.

Block lowering (:mod:`.blocks`), the context-parallel emitter (:mod:`.context_parallel`) and the
expert-parallel emitter (:mod:`.expert_parallel`) all need to tell the attention core, keys/values,
routed tokens and expert weights apart by the graph's naming conventions (dims ``sk``/``skw``,
``t``, ``e``, ``fe``; the ``attn_core`` op attribute); keeping these predicates in one place keeps
the three in agreement.
"""

from __future__ import annotations

from tensorstage.graph.ir import Block, Op, Tensor


def is_core(op: Op) -> bool:
    """The attention core (or its gradient): what CP costs as the unsharded op / cp."""
    src = op.grad_of if op.grad_of is not None else op
    return bool(op.attrs.get("attn_core") or src.attrs.get("attn_core"))


def is_expert_weight(t: Tensor) -> bool:
    """A routed expert's weight (or its gradient): leading dim ``e``, split over EP."""
    return t.role in ("weight", "weight_grad") and len(t.dims) >= 2 and t.dims[0] == "e"


def gemm_dims(op: Op) -> tuple[set[str], set[str], set[str], set[str]] | None:
    """Dims of a two-operand einsum as ``(batch, m, n, k)``: batch dims are in both inputs and the
    output, m in the first input and the output, n in the second and the output, k in both inputs
    only (the contraction). ``None`` for other ops. Block lowering sizes them per rank
    (``Node.gemm``); the explorer's screen per candidate."""
    if op.kind != "einsum" or not op.einsum or "->" not in op.einsum:
        return None
    lhs, out = op.einsum.split("->")
    operands = lhs.split(",")
    if len(operands) != 2:
        return None
    da, db, dc = set(operands[0].split()), set(operands[1].split()), set(out.split())
    return da & db & dc, (da & dc) - db, (db & dc) - da, (da & db) - dc


def is_expert_gemm(op: Op) -> bool:
    """An MoE expert GEMM (an einsum reading or writing a routed expert's weight): grouped over the
    local experts, charged the measured grouped-GEMM efficiency."""
    return op.kind == "einsum" and any(is_expert_weight(t) for t in tensors(op))


def tensors(op: Op) -> tuple[Tensor, ...]:
    """Inputs then outputs of ``op``."""
    return (*op.inputs, *op.outputs)


def expert_side(op: Op) -> bool:
    """Op that runs on the expert side of the all-to-all (expert MLPs and their gradients)."""
    for o in (op, op.grad_of):
        if o is not None and any("fe" in t.dims or is_expert_weight(t) for t in tensors(o)):
            return True
    return False


def uses_experts(op: Op) -> bool:
    """Op whose cost depends on the local expert count (routed tokens or expert weights)."""
    return any("t" in t.dims or is_expert_weight(t) for t in tensors(op))


def reads_kv(t: Tensor) -> bool:
    """Keys/values (or their gradients) on the key axis."""
    return "sk" in t.dims or "skw" in t.dims


def final_grad(blk: Block, x: Tensor) -> Tensor | None:
    """The last gradient tensor of ``x`` the block's backward produces (after accumulation)."""
    out = None
    prefix = f"{x.name}.grad"
    for op in blk.backward:
        for t in op.outputs:
            if t.name == prefix or t.name.startswith(prefix + "_acc") or t.name == f"{x.name}.grad_acc":
                out = t
    return out


def to_int(x: float) -> int:
    """Round a cost to an integer (costs are exact up to float noise or causal halves)."""
    return int(round(float(x)))


__all__ = [
    "expert_side",
    "final_grad",
    "is_core",
    "is_expert_weight",
    "reads_kv",
    "tensors",
    "to_int",
    "uses_experts",
]
