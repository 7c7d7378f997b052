"""Optimizer-step ops (Adam/AdamW, SGD) under a mixed-precision policy.

One op per weight tensor, category ``optimizer``, so a ZeRO/FSDP pass can shard the step with the
weight. Bytes follow the policy: the step reads the gradient (``grad_dtype``), the fp32 master copy
and the states, writes master and states back and writes the compute-dtype copy of the parameter
(when a master copy exists). ``vector_flops`` per element: AdamW 12 (two moment updates, bias
corrections, sqrt, divide, weight decay, update), Adam 11, SGD with momentum 4, plain SGD 2 —
rough constants; the step is memory-bound and its bytes are what matters.
"""

from __future__ import annotations

import sympy as sp

from tensorstage.graph.ir import Op, Tensor
from tensorstage.graph.options import GraphOptions, Precision

_VFLOPS_PER_ELEM = {"adamw": 12, "adam": 11, "sgd_momentum": 4, "sgd": 2}


def _like(t: Tensor, suffix: str, dtype: str, role: str) -> Tensor:
    return Tensor(f"{t.name}.{suffix}", t.dims, dtype, role, t.numel)


def optimizer_ops(weights: list[Tensor], options: GraphOptions, prec: Precision) -> list[Op]:
    """The optimizer step of ``weights`` (in order)."""
    ops: list[Op] = []
    kind = options.optimizer
    if kind == "sgd" and options.sgd_momentum:
        kind = "sgd_momentum"
    n_states = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}[kind]
    for w in weights:
        grad = _like(w, "grad", prec.grad_dtype, "weight_grad")
        master = _like(w, "master", prec.master_dtype, "master_weight") if prec.master_dtype else w
        states = [
            _like(w, name, prec.state_dtype, "optimizer_state")
            for name in ("exp_avg", "exp_avg_sq")[:n_states]
        ]
        ins = (grad, master, *states)
        outs = (master, *states) + ((w,) if prec.master_dtype else ())
        ops.append(
            Op(
                f"{w.name}.{options.optimizer}_step",
                kind,
                "optimizer",
                ins,
                outs,
                sp.Integer(0),
                _VFLOPS_PER_ELEM[kind] * w.numel,
                sp.Add(*(t.nbytes for t in ins)),
                sp.Add(*(t.nbytes for t in outs)),
                attrs={"weight": w.name},
            )
        )
    return ops
