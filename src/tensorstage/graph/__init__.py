"""Symbolic tensor graph of a model: forward, autodiff backward and optimizer step, with costs.

Public API::

    from tensorstage.graph import build_graph, GraphOptions
    g = build_graph(spec, "train", GraphOptions(recompute="selective"))
    g.costs({"b": 1, "s": 4096})          # CostReport: per_block / totals / per_layer(metric)
    g.costs({"b": np.array([...]), "s": ...})  # vectorized over many bindings
    g.costs({...}, exact=True)             # exact sympy integers
    g.weights()                            # [(qualified name, Tensor)], sums to the parameter count
    g.block_exprs(g.layers["dense"])       # closed-form sympy expression of every metric
    g.op_costs("dense", {"b": 1, "s": 4096})  # per-op flops/bytes arrays (compiled, all_ops() order)
    g.evaluate(tensor.nbytes, bindings)    # any expression, exactly
    for layer, block, op in g.execution(): # ops in execution order (what lowering consumes)
        op.kind, op.category, op.einsum, op.inputs[i].dims, op.flops, op.bytes_read, op.saved

Blocks: ``g.embedding``, ``g.layers[kind]`` (one per layer kind — ``dense``, ``moe``,
``mla_dense``, ``mla_moe``, ``dense_swa``/``moe_swa`` for sliding-window layers — reused for every layer of that
kind; ``g.layer_kinds[i]`` names the kind of layer ``i``) and ``g.head``. Each block has
``forward``, ``recompute``, ``backward`` and ``optimizer`` op lists, ``weights``, ``saved``
(activations kept for backward under the recompute policy) and ``kv_cache`` (per-token slices).
See :mod:`tensorstage.graph.ir` for tensors/ops, :mod:`tensorstage.graph.builder` for the cost
rules, :mod:`tensorstage.graph.autodiff` for the VJP rules and :mod:`tensorstage.graph.options`
for the conventions (attention FLOPs, flash vs materialized, precision).
"""

from tensorstage.graph.dims import DTYPE_BYTES, SYMBOLS, dtype_bytes
from tensorstage.graph.graph import (
    METRICS,
    CostReport,
    Graph,
    apply_recompute,
    build_graph,
    state_bytes_per_param,
)
from tensorstage.graph.ir import CATEGORIES, Block, Op, Tensor
from tensorstage.graph.options import GraphOptions, Precision

__all__ = [
    "CATEGORIES",
    "DTYPE_BYTES",
    "METRICS",
    "SYMBOLS",
    "Block",
    "CostReport",
    "Graph",
    "GraphOptions",
    "Op",
    "Precision",
    "Tensor",
    "apply_recompute",
    "build_graph",
    "dtype_bytes",
    "state_bytes_per_param",
]
