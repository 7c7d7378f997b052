"""The graph IR: tensors with named dims, ops with symbolic costs, and blocks of ops.

A :class:`Tensor` has named dims (see :mod:`tensorstage.graph.dims`), a dtype and a role. An
:class:`Op` reads and writes tensors and carries its cost as sympy expressions over the free
symbols: ``flops`` (matrix-engine FLOPs, 2 per multiply-add, the quantity MFU and
``torch.utils.flop_counter`` count), ``vector_flops`` (elementwise/norm/softmax work, kept apart
so matmul totals stay comparable with published formulas), ``bytes_read`` and ``bytes_written``
(tensor sizes by dtype). Matmul-like ops carry an ``einsum`` spec over dim names
(``"b s h, h f -> b s f"``): a sharding pass reads from it which dims are contracted (a split
contracted dim makes the result a Partial sum) and which are kept.

Forward ops also list ``saved``: the tensors autograd keeps for their backward. Backward ops point
back to the forward op they differentiate (``grad_of``) and have category ``bwd_input`` or
``bwd_weight`` (kept as separate ops so zero-bubble schedules can move weight-grads later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy as sp

from tensorstage.graph.dims import dtype_bytes

ROLES = (
    "weight",
    "activation",
    "gradient",
    "weight_grad",
    "optimizer_state",
    "master_weight",
    "kv_cache",
    "index",
    "mask",
    "input",
)
CATEGORIES = ("fwd", "bwd_input", "bwd_weight", "recompute", "optimizer")


@dataclass(eq=False)
class Tensor:
    """A symbolic tensor: ``dims`` are names resolved through the graph's dim-size table.

    Identity matters (``eq=False``): two tensors with equal shapes are still different buffers,
    and saved-bytes totals deduplicate by identity, as PyTorch does by storage.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    role: str
    numel: sp.Expr
    requires_grad: bool = False

    @property
    def nbytes(self) -> sp.Expr:
        """Size in bytes (symbolic)."""
        return self.numel * dtype_bytes(self.dtype)

    def __repr__(self) -> str:
        return f"Tensor({self.name}: {self.dtype}[{' '.join(self.dims)}] {self.role})"


@dataclass(eq=False)
class Op:
    """One operation with its cost rule evaluated to symbolic expressions."""

    name: str
    kind: str
    category: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    flops: sp.Expr
    vector_flops: sp.Expr
    bytes_read: sp.Expr
    bytes_written: sp.Expr
    einsum: str | None = None
    saved: tuple[Tensor, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    grad_of: Op | None = None

    @property
    def bytes_total(self) -> sp.Expr:
        """Bytes moved (read + written)."""
        return self.bytes_read + self.bytes_written

    def __repr__(self) -> str:
        spec = f" {self.einsum}" if self.einsum else ""
        return f"Op({self.category}:{self.kind} {self.name}{spec})"


@dataclass(eq=False)
class Block:
    """A reusable piece of the graph (embedding, one layer kind, head+loss).

    ``forward``, ``recompute`` and ``backward`` are in execution order; ``saved`` are the tensors
    kept between forward and backward under the graph's recompute policy; ``inputs`` are the tensors
    entering the block (the residual stream for a layer) and ``outputs`` those leaving it (what a
    pipeline stage boundary sends; the gradient sent back has the same shape). ``optimizer`` holds
    the block's optimizer-step ops (training graphs only).
    """

    name: str
    kind: str
    forward: list[Op]
    recompute: list[Op]
    backward: list[Op]
    weights: list[Tensor]
    saved: list[Tensor]
    inputs: list[Tensor]
    kv_cache: list[Tensor] = field(default_factory=list)  # per-token slices (no b / s dims)
    outputs: list[Tensor] = field(default_factory=list)  # what leaves the block (pipeline boundary)
    optimizer: list[Op] = field(default_factory=list)

    def ops(self) -> list[Op]:
        """All ops in execution order: forward, then recompute, then backward."""
        return [*self.forward, *self.recompute, *self.backward]

    def all_ops(self) -> list[Op]:
        """Forward, recompute, backward and this block's optimizer-step ops."""
        return [*self.forward, *self.recompute, *self.backward, *self.optimizer]

    @property
    def activation_bytes(self) -> sp.Expr:
        """Bytes kept from forward to backward (weights excluded: they live anyway)."""
        return sp.Add(*(t.nbytes for t in self.saved if t.role != "weight"))

    @property
    def param_count(self) -> sp.Expr:
        """Number of weight elements of the block."""
        return sp.Add(*(t.numel for t in self.weights))

    @property
    def kv_cache_bytes_per_token(self) -> sp.Expr:
        """KV-cache bytes one token of one sequence adds in this block.

        ``kv_cache`` holds one per-token slice per cached tensor (dims without batch and sequence).
        """
        return sp.Add(*(t.nbytes for t in self.kv_cache))
