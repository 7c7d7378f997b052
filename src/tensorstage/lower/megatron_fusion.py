"""Megatron-LM's fused element-wise kernels, as a merge of a block's per-rank nodes.

The graph IR emits one op per mathematical step (bias add, dropout, residual add, activation,
one reduction per LayerNorm parameter gradient), which is what an eager framework without fusion
runs. Megatron-LM (2020 onwards: the Narayanan 2021 and Korthikanti 2022 runs) fuses some of them
into single kernels, each reading its inputs and writing its outputs once. With
``GraphOptions.megatron_fusions`` the block lowering merges the matching node runs of the
forward, recompute and backward lists into one node each (one launch) with the fused kernel's
bytes. ``X`` = the bytes of one activation tensor the kernel streams (``b*s*h`` elements x 2 for
fp16/bf16), ``M`` = its dropout mask (1 byte per element):

* **bias + dropout + residual add** (``bias_dropout_add_fused_train``, after the attention output
  and MLP down projections, whose row-parallel linears skip their bias and reduce the GEMM output,
  so the TP all-reduce / reduce-scatter moves in front of the bias add): reads the reduced GEMM
  output and the residual, writes the sum and the mask: ``3X + M`` (7 bytes/element in fp16)
  instead of ``bias add 2X + dropout (2X + M) + add 3X`` = ``7X + M`` (15 bytes/element) in three
  kernels. From the nodes' own bytes: ``dropout + residual / 3``.
* **bias + GeLU** (``bias_gelu_impl`` after the first MLP projection, which skips its bias): reads
  the GEMM output, writes the activation: ``2F`` (F = one ``b*s*f/tp`` tensor) instead of
  ``2F + 2F`` in two kernels. From the nodes' own bytes: the activation's.
* **apex fused LayerNorm backward** (``FusedLayerNormAffineFunction``): one pass computes the input
  gradient, one pass (``cuComputePartGradGammaBeta`` + its small final reduction) both the weight
  and bias gradients, reading ``dy`` and ``x`` once: ``2X`` instead of ``2X`` per parameter. From the
  nodes' own bytes: the weight gradient's.

Not merged (Megatron runs them as separate kernels too): the q/k/v bias adds
(``LinearWithGradAccumulationAndAsyncCommunication`` adds the bias after ``torch.matmul``),
``FusedScaleMaskSoftmax`` (one kernel already, same bytes), attention dropout, backward dropout
and bias-gradient reductions, residual gradient accumulation. FLOPs are kept (their sum).

A run is merged only if its nodes are consecutive COMP nodes of the list and every node after the
first depends only on nodes of the run or on the first node's dependencies, so the merged node
starts when the first would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from tensorstage.lower.steps import BlockLowering, StepNode
from tensorstage.schedule.program import NodeKind


def _deps(nodes: list[StepNode], i: int) -> tuple[int, ...]:
    d = nodes[i].deps
    return ((i - 1,) if i else ()) if d is None else d


_RECOMPUTE = ".recompute"


def _base(name: str) -> str:
    """A node's graph-op name without the recompute suffix."""
    return name[: -len(_RECOMPUTE)] if name.endswith(_RECOMPUTE) else name


def _is_bias_dropout_add(bias: StepNode, drop: StepNode, add: StepNode) -> bool:
    return (_base(bias.name).endswith("_proj.bias_add") and _base(drop.name).endswith("out_dropout")
            and _base(add.name).endswith(".residual") and bias.category == drop.category == add.category)


def _bias_dropout_add(run: list[StepNode]) -> int | None:
    """``3X + M`` = dropout (``2X + M``) + residual add / 3 (``X``): both on the same (possibly
    sequence-sharded) tokens, unlike the bias add, which may run before a reduce-scatter."""
    if not _is_bias_dropout_add(*run):
        return None
    return run[1].tensor_bytes + run[2].tensor_bytes // 3


def _bias_gelu(run: list[StepNode]) -> int | None:
    bias, act = run
    ok = (_base(bias.name).endswith(".bias_add") and _base(act.name).endswith(".act")
          and bias.category == act.category)
    return act.tensor_bytes if ok else None


def _norm_grad_wb(run: list[StepNode]) -> int | None:
    w, b = run
    head, sep, tail = w.name.partition(".grad_w:")
    ok = bool(sep) and tail.endswith(".weight") and b.name == f"{head}.grad_w:{tail[:-len('weight')]}bias"
    return w.tensor_bytes if ok and w.category == b.category else None


def _hoist_reductions(nodes: list[StepNode]) -> list[StepNode]:
    """Move the TP reduction of a row-parallel output in front of its bias add where the bias add,
    dropout and residual add will fuse: Megatron's row-parallel linears skip the bias and reduce the
    GEMM output; the fused kernel adds the bias after the reduction (same message size)."""
    out = list(nodes)
    n = len(out)
    for i in range(n - 3):
        bias, coll, drop, add = out[i:i + 4]
        if (bias.kind != NodeKind.COMP or coll.kind != NodeKind.COLL
                or not coll.name.startswith(_base(bias.name) + ":") or _deps(out, i + 1) != (i,)
                or drop.kind != NodeKind.COMP or add.kind != NodeKind.COMP
                or not _is_bias_dropout_add(bias, drop, add)):
            continue
        if any(i in _deps(out, j) or i + 1 in _deps(out, j) for j in range(i + 4, n)):
            continue  # someone else reads the bias add or the reduced tensor: leave the order alone
        out[i], out[i + 1] = replace(coll, deps=_deps(out, i)), replace(bias, deps=(i,))
        out[i + 2] = replace(drop, deps=(i + 1,)) if _deps(out, i + 2) == (i + 1,) else drop
    return out


#: (run length, bytes of the fused kernel or None if the run does not match, fused name suffix)
PATTERNS: tuple[tuple[int, Callable[[list[StepNode]], int | None], str], ...] = (
    (3, _bias_dropout_add, "bias_dropout_add"),
    (2, _bias_gelu, "bias_gelu"),
    (2, _norm_grad_wb, "grad_weight_bias"),
)


def fuse_megatron(nodes: list[StepNode]) -> list[StepNode]:
    """``nodes`` with every run matching :data:`PATTERNS` merged into one node (module docstring)."""
    nodes = _hoist_reductions(nodes)
    n = len(nodes)
    groups: list[tuple[int, int, StepNode | None]] = []  # (first, last, merged node or None)
    i = 0
    while i < n:
        merged = None
        for length, rule, suffix in PATTERNS:
            run = nodes[i:i + length]
            if len(run) < length or any(x.kind != NodeKind.COMP for x in run):
                continue
            inside = set(range(i, i + length)) | set(_deps(nodes, i))
            if any(not set(_deps(nodes, j)) <= inside for j in range(i + 1, i + length)):
                continue
            nbytes = rule(run)
            if nbytes is None:
                continue
            first = run[0]
            merged = replace(first, name=f"{first.name.rsplit('.', 1)[0]}.{suffix}", op="elementwise",
                             flops=sum(x.flops for x in run), tensor_bytes=nbytes)
            groups.append((i, i + length - 1, merged))
            i += length
            break
        if merged is None:
            groups.append((i, i, None))
            i += 1
    if len(groups) == n:
        return list(nodes)
    new_index = [0] * n
    for g, (lo, hi, _) in enumerate(groups):
        for j in range(lo, hi + 1):
            new_index[j] = g
    out = []
    for lo, _hi, merged in groups:
        node = merged if merged is not None else nodes[lo]
        deps = node.deps if node.deps is None else tuple(dict.fromkeys(new_index[d] for d in node.deps))
        out.append(replace(node, deps=deps))
    return out


def fuse_megatron_block(block: BlockLowering) -> BlockLowering:
    """A copy of ``block`` with Megatron's fused kernels in its forward, recompute and backward lists."""
    return replace(block, forward=fuse_megatron(block.forward), recompute=fuse_megatron(block.recompute),
                   backward=fuse_megatron(block.backward))
