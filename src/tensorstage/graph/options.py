"""Options of a graph build: phase, recompute, attention convention, precision, optimizer.

Conventions a user must be able to choose because published numbers differ on them:

* ``attention_flops``: ``causal_half`` (default; QK^T and PV each 2*b*nh*s*s*dh non-causal,
  halved for a causal mask, s^2/2 not s(s+1)/2 — Megatron-Core's convention) or ``full`` (no
  halving: Narayanan et al. 2021, PaLM's MFU, and what ``torch.utils.flop_counter`` counts).
* ``attention_impl``: ``flash`` (fused kernel, saves q/k/v/out + fp32 log-sum-exp; backward
  recomputes QK^T inside the kernel) or ``materialized`` (eager softmax: saves probabilities and
  dropout mask/output; Korthikanti's ``5as/h`` term).
* ``norm_stats``: count the per-token fp32 mean/rstd norms keep (PyTorch does; Korthikanti's
  formula does not).
* ``optimizer_impl``: ``megatron`` (default: Megatron-LM's mixed-precision step with its separate
  gradient passes, 58 bytes/param for fp16 Adam) or ``fused`` (one fused kernel, 30 bytes/param);
  see :mod:`tensorstage.graph.optimizer`.
* ``dropout_mask_dtype``: ``bool`` (1 byte, CUDA/Megatron) or e.g. ``fp32`` (PyTorch CPU keeps a
  float mask).
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorstage.errors import SpecError, require
from tensorstage.graph.dims import DTYPE_BYTES

PHASES = ("train", "prefill", "decode")
RECOMPUTE = ("none", "selective", "full")
ATTENTION_IMPLS = ("flash", "materialized")
ATTENTION_FLOPS = ("causal_half", "full")
OPTIMIZERS = ("adamw", "adam", "sgd")
OPTIMIZER_IMPLS = ("megatron", "fused")
PRECISIONS = ("bf16", "fp16", "fp8", "fp32")


@dataclass(frozen=True)
class Precision:
    """Mixed-precision policy: which dtype each kind of tensor is kept in.

    ``master_dtype`` is None when the optimizer updates the parameters in place (fp32 training).
    """

    compute_dtype: str
    param_dtype: str
    act_dtype: str
    grad_dtype: str
    master_dtype: str | None
    state_dtype: str

    @classmethod
    def named(cls, name: str, grad_dtype: str | None = None) -> Precision:
        """Policy preset: 16-bit/fp8 compute with fp32 master weights and states.

        Gradients (accumulated and data-parallel reduced in ``grad_dtype``) default to the
        framework default of each precision: fp32 for bf16 and fp8 (Megatron-LM forces fp32
        accumulation and reduction for bf16: ``arguments.py``, "bfloat16 requires gradient
        accumulation and all-reduce to be done in fp32"), **fp16 for fp16**: Megatron-LM's DDP
        buffers take the parameter dtype unless ``--accumulate-allreduce-grads-in-fp32`` is given
        (``megatron/model/distributed.py`` ``_get_buffer_type``, April 2021; Megatron-Core's
        ``grad_reduce_in_fp32`` follows the same flag), and the GPT-3 launch scripts of
        Narayanan et al. 2021 and the Megatron README run ``--fp16`` without it; DeepSpeed and
        FSDP2 reduce fp16 gradients in fp16 too. Pass ``grad_dtype`` to override (e.g. ``"fp32"``
        for ``--accumulate-allreduce-grads-in-fp32``, ``"bf16"`` for 16-bit bf16 gradients).
        """
        require(name in PRECISIONS, "precision", f"unknown precision {name!r}", PRECISIONS)
        if grad_dtype is not None:
            require(grad_dtype in DTYPE_BYTES, "grad_dtype", f"unknown dtype {grad_dtype!r}", DTYPE_BYTES)
        if name == "fp32":
            return cls("fp32", "fp32", "fp32", grad_dtype or "fp32", None, "fp32")
        half = "fp16" if name == "fp16" else "bf16"
        compute = "fp8" if name == "fp8" else half
        return cls(compute, half, half, grad_dtype or ("fp16" if name == "fp16" else "fp32"), "fp32", "fp32")


@dataclass(frozen=True)
class GraphOptions:
    """Everything about a graph build that is not the model architecture."""

    phase: str = "train"
    recompute: str = "none"
    # selective recompute: Megatron-Core recompute_modules (graph.graph.apply_recompute); () = core_attn
    recompute_modules: tuple[str, ...] = ()
    attention_impl: str = "flash"
    causal: bool = True
    attention_flops: str = "causal_half"
    dropout: bool = False
    dropout_mask_dtype: str = "bool"
    precision: str = "bf16"
    grad_dtype: str | None = None
    optimizer: str = "adamw"
    optimizer_impl: str = "megatron"  # passes of one step: see graph/optimizer.py
    sgd_momentum: bool = True
    loss_dtype: str = "fp32"
    kv_dtype: str | None = None  # None = activation dtype
    norm_stats: bool = True
    capacity_factor: float | None = None  # None = the spec's, or 1.0 (dropless)
    routing_skew: float = 1.0
    # Megatron-LM's fused element-wise kernels (bias-dropout-add, bias-GeLU, apex LayerNorm backward),
    # applied by the block lowering: tensorstage.lower.megatron_fusion
    megatron_fusions: bool = False
    # a gated MLP's gate and up projections as one GEMM (Megatron-Core's linear_fc1, vLLM's
    # MergedColumnParallelLinear); None = with megatron_fusions. TensorRT-LLM's TRT-engine GatedMLP
    # (releases 0.5-0.7) ran them as two GEMMs
    fused_gate_up: bool | None = None

    def validate(self) -> None:
        """Raise :class:`SpecError` naming the first bad field."""
        require(self.phase in PHASES, "phase", f"unknown phase {self.phase!r}", PHASES)
        require(self.recompute in RECOMPUTE, "recompute", f"unknown policy {self.recompute!r}", RECOMPUTE)
        require(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            f"unknown attention implementation {self.attention_impl!r}",
            ATTENTION_IMPLS,
        )
        require(
            self.attention_flops in ATTENTION_FLOPS,
            "attention_flops",
            f"unknown convention {self.attention_flops!r}",
            ATTENTION_FLOPS,
        )
        require(
            self.optimizer in OPTIMIZERS, "optimizer", f"unknown optimizer {self.optimizer!r}", OPTIMIZERS
        )
        require(
            self.optimizer_impl in OPTIMIZER_IMPLS,
            "optimizer_impl",
            f"unknown optimizer implementation {self.optimizer_impl!r}",
            OPTIMIZER_IMPLS,
        )
        for fld in ("dropout_mask_dtype", "loss_dtype", "kv_dtype"):
            val = getattr(self, fld)
            if val is not None and val not in DTYPE_BYTES:
                raise SpecError(fld, f"unknown dtype {val!r}", sorted(DTYPE_BYTES))
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, "capacity_factor", "must be > 0")
        require(self.routing_skew >= 1.0, "routing_skew", "must be >= 1 (hottest expert load / mean load)")
        self.precision_policy()

    def precision_policy(self) -> Precision:
        """The :class:`Precision` these options select."""
        return Precision.named(self.precision, self.grad_dtype)
