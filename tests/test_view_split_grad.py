"""Gradients through zero-copy split views (fused projections' q/k/v, gate/up)."""

from __future__ import annotations

import sympy as sp

from tensorstage.graph.autodiff import backward
from tensorstage.graph.builder import Builder
from tensorstage.graph.dims import base_dim_sizes


def _builder() -> Builder:
    return Builder(base_dim_sizes("train"), "bf16", "bf16")


def _grads(bld: Builder, outs):
    seeds = {id(t): bld.tensor(f"{t.name}.grad", t.dims, role="gradient") for t in outs}
    return backward(bld, list(bld.ops), seeds, "fp32")


def test_views_write_disjoint_slices_of_one_gradient():
    """Two views of one tensor: each part's gradient is copied into the fused gradient once (a
    concatenation), nothing is summed, and the fused tensor ends with one gradient."""
    bld = _builder()
    x = bld.tensor("x", "b s two f", requires_grad=True)
    gate = bld.layout("gate", x, "b s f", "split", copy=False)
    up = bld.layout("up", x, "b s f", "split", copy=False)
    y = bld.add("y", gate, up)
    ops, grads = _grads(bld, [y])
    copies = [op for op in ops if op.attrs.get("fn") == "split_grad"]
    assert len(copies) == 2
    part = bld.numel(("b", "s", "f")) * 2  # bf16 bytes of one part
    assert all(sp.simplify(op.bytes_read - part) == 0 and sp.simplify(op.bytes_written - part) == 0 for op in copies)
    assert not [op for op in ops if op.kind == "add" and op.name.endswith("grad_accumulate")]
    assert grads[id(x)] is copies[-1].outputs[0]


def test_a_fused_tensor_with_another_consumer_sums_its_gradients():
    """``x`` feeds two views and a non-view op: the views' slices are summed onto the other op's
    gradient (two accumulations over the whole tensor), not dropped."""
    bld = _builder()
    x = bld.tensor("x", "b s two f", requires_grad=True)
    gate = bld.layout("gate", x, "b s f", "split", copy=False)
    up = bld.layout("up", x, "b s f", "split", copy=False)
    y = bld.add("y", gate, up)
    w = bld.unary("w", "gelu", x)
    ops, grads = _grads(bld, [y, w])
    acc = [op for op in ops if op.name == "x.grad_accumulate"]
    assert len(acc) == 2
    assert all(sp.simplify(op.vector_flops - x.numel) == 0 for op in acc)
    assert grads[id(x)] is acc[-1].outputs[0]


def test_grad_in_place_views_cost_nothing():
    """A fused kernel that writes the fused gradient itself (Megatron's SwiGLU backward): the views'
    gradients move no bytes."""
    bld = _builder()
    x = bld.tensor("x", "b s two f", requires_grad=True)
    gate = bld.layout("gate", x, "b s f", "split", copy=False, grad_in_place=True)
    up = bld.layout("up", x, "b s f", "split", copy=False, grad_in_place=True)
    y = bld.add("y", gate, up)
    ops, _ = _grads(bld, [y])
    copies = [op for op in ops if op.attrs.get("fn") == "split_grad"]
    assert len(copies) == 2 and all(op.bytes_read == 0 and op.bytes_written == 0 for op in copies)
