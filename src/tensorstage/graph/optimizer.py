"""Optimizer-step ops (Adam/AdamW, SGD) under a mixed-precision policy and a framework's step.

One op per weight tensor, category ``optimizer``, so a ZeRO/FSDP pass can shard the step with the
weight (``assemble`` scales each by the shard factor and relies on one op per weight). The step is
memory-bound, so its bytes are what matters; ``vector_flops`` per element are rough constants
(AdamW 12: two moment updates, bias corrections, sqrt, divide, weight decay, update; Adam 11;
SGD with momentum 4; plain SGD 2; each extra pass below adds its own 0-2).

``GraphOptions.optimizer_impl`` picks what one step touches (``G`` = gradient bytes per element
in ``grad_dtype``, ``M`` = master bytes, ``P`` = 16-bit parameter bytes, ``S`` = state bytes):

* ``fused``: one fused kernel per weight: read gradient, master copy and states, write master and
  states back and the compute-dtype copy of the parameter (when a master copy exists). Adam with
  fp32 gradients, master and states, 16-bit params: ``4 + 4 + 8`` read, ``4 + 8 + 2`` written
  = **30 bytes per parameter**.
* ``megatron`` (default): the passes Megatron-LM's mixed-precision step makes over every
  parameter each iteration (``Float16OptimizerWithFloat16Params`` with ``LocalDDP``'s contiguous
  fp32 ``main_grad`` buffer, Megatron-LM 2021-22 ``megatron/optimizer/optimizer.py``,
  ``megatron/model/distributed.py``, ``megatron/optimizer/clip_grads.py``; Megatron-Core keeps
  the same passes):

  ==========================================  =========================  =====================
  pass (Megatron call)                        bytes per parameter         when
  ==========================================  =========================  =====================
  ``zero_grad_buffer`` (``buffer_.zero()``)   write G                    every step
  ``allreduce_gradients``: ``buffer /= dp``   read G + write G           every step (also dp=1)
  unscale + inf check
  (``_amp_foreach_non_finite_check_and_unscale_``) read G + write G      fp16 (loss scaling)
  grad norm for clipping
  (``amp_C.multi_tensor_l2norm``)              read G                     every step (clip 1.0)
  Adam (``apex multi_tensor_adam``)           read G + M + S, write M + S every step
  ``_copy_main_params_to_model_params``
  (``multi_tensor_scale`` fp32 -> 16-bit)     read M + write P           with a master copy
  ==========================================  =========================  =====================

  fp16 with fp32 grads/master/states: ``4 + 8 + 8 + 4 + 28 + 6`` = **58 bytes per parameter**;
  bf16 (no loss scaler in Megatron): **50**; fp32 training (no master copy): ``4 + 8 + 4 + 28``
  = **44**. With 16-bit gradients (fp16's default, :class:`~tensorstage.graph.options.Precision`)
  the buffer passes (zero, average) touch ``G`` = 2 bytes and one more pass,
  ``_copy_model_grads_to_main_grads`` (``main_param.grad = model_param.main_grad.float()``:
  read 2 + write 4), makes the fp32 gradient the unscale, norm and Adam passes then read
  (:func:`main_grad_copy_dtype`; its memory is ``state_bytes_per_param``'s ``grad_copy``):
  fp16 ``2 + 4 + 6 + 8 + 4 + 28 + 6`` = **58** as well. Not included: the clip's rescale of the gradients (only when the norm exceeds
  ``clip_grad``, data-dependent) and the scalar all-reduces of the norm and the inf flag (the
  norm's is a COLL node in ``lower.assemble``). The passes are separate multi-tensor kernels in
  Megatron, but each launch there covers up to ~21 M elements (``multi_tensor_apply``: 320 blocks
  of 65,536), about one weight tensor, so one op per weight (one launch) is kept.
"""

from __future__ import annotations

import sympy as sp

from tensorstage.graph.dims import dtype_bytes
from tensorstage.graph.ir import Op, Tensor
from tensorstage.graph.options import GraphOptions, Precision

_VFLOPS_PER_ELEM = {"adamw": 12, "adam": 11, "sgd_momentum": 4, "sgd": 2}
#: Megatron's passes besides the update: grad zero 0, DP average 1, fp32 copy 0, unscale + check 2,
#: L2 norm 2.
_MEGATRON_EXTRA_VFLOPS = {"zero": 0, "average": 1, "copy": 0, "unscale": 2, "norm": 2}


def _like(t: Tensor, suffix: str, dtype: str, role: str) -> Tensor:
    return Tensor(f"{t.name}.{suffix}", t.dims, dtype, role, t.numel)


def main_grad_copy_dtype(options: GraphOptions, prec: Precision) -> str | None:
    """dtype of the gradient copy Megatron's mixed-precision optimizer steps on, or None.

    ``Float16OptimizerWithFloat16Params._copy_model_grads_to_main_grads`` sets each fp32 master
    parameter's ``.grad`` to ``main_grad.float()``: a new fp32 tensor when the gradients are
    16-bit (the same tensor when they are already fp32). Only for the ``megatron`` step with a
    master copy; a ``fused`` step reads the gradient as it is (DeepSpeed's accounting, ZeRO's
    K = 12, charges no copy)."""
    if options.optimizer_impl != "megatron" or not prec.master_dtype:
        return None
    return prec.master_dtype if dtype_bytes(prec.grad_dtype) < dtype_bytes(prec.master_dtype) else None


def megatron_passes(prec: Precision, grad_copy: bool = False) -> tuple[str, ...]:
    """Names of the gradient passes Megatron makes besides the update (see module docstring)."""
    passes = ("zero", "average") + (("copy",) if grad_copy else ())
    if prec.param_dtype == "fp16":  # dynamic loss scaler: unscale + inf/nan check
        passes += ("unscale",)
    return passes + ("norm",)


def optimizer_ops(weights: list[Tensor], options: GraphOptions, prec: Precision) -> list[Op]:
    """The optimizer step of ``weights`` (in order), one op per weight."""
    ops: list[Op] = []
    kind = options.optimizer
    if kind == "sgd" and options.sgd_momentum:
        kind = "sgd_momentum"
    n_states = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}[kind]
    megatron = options.optimizer_impl == "megatron"
    copy_dtype = main_grad_copy_dtype(options, prec)
    passes = megatron_passes(prec, copy_dtype is not None) if megatron else ()
    for w in weights:
        buffer = _like(w, "grad", prec.grad_dtype, "weight_grad")  # the DDP buffer (main_grad)
        grad = _like(w, "grad_fp32", copy_dtype, "weight_grad") if copy_dtype else buffer  # what the step reads
        master = _like(w, "master", prec.master_dtype, "master_weight") if prec.master_dtype else w
        states = [
            _like(w, name, prec.state_dtype, "optimizer_state")
            for name in ("exp_avg", "exp_avg_sq")[:n_states]
        ]
        ins = (grad, master, *states)
        outs = (master, *states) + ((w,) if prec.master_dtype else ())
        read = sp.Add(*(t.nbytes for t in ins))
        written = sp.Add(*(t.nbytes for t in outs))
        vflops = _VFLOPS_PER_ELEM[kind] * w.numel
        if megatron:
            g, b = grad.nbytes, buffer.nbytes  # zero and average run on the buffer, the rest on the step's copy
            read += sum(({"average": b, "copy": b, "unscale": g, "norm": g}.get(p, 0) for p in passes),
                        sp.Integer(0))
            written += sum(({"zero": b, "average": b, "copy": g, "unscale": g}.get(p, 0) for p in passes),
                           sp.Integer(0))
            vflops += sum(_MEGATRON_EXTRA_VFLOPS[p] for p in passes) * w.numel
            if prec.master_dtype:  # separate copy kernel: the update no longer writes w, the copy
                read += master.nbytes  # reads the master and writes w (counted in ``outs``)
        ops.append(
            Op(
                f"{w.name}.{options.optimizer}_step",
                kind,
                "optimizer",
                ins,
                outs,
                sp.Integer(0),
                vflops,
                read,
                written,
                attrs={"weight": w.name, "impl": options.optimizer_impl, "passes": passes},
            )
        )
    return ops
