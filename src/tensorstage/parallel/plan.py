"""`ParallelPlan`: how one model is split over ranks, plus the rules that make a plan legal.

The plan is plain data (pydantic, frozen): its field names are exactly the keys of a plan YAML
and the long names of the CLI plan flags (``global_batch`` <-> ``--global-batch``). Checking is in
two layers so that every bad plan fails with one line naming the rule:

* :meth:`ParallelPlan.check` - rules that need only the plan (batch arithmetic, schedule vs
  virtual stages, rank order, EP vs DP x CP, sequence vs CP);
* :meth:`ParallelPlan.validate_for` - :meth:`check` plus rules against a :class:`ModelSpec`
  (heads, KV heads, FFN width and experts vs TP/EP, layers vs PP x VPP) and an optional world size.

Decisions (documented so the lowering and users can rely on them):

* ``sp`` with ``tp == 1`` is a no-op and is normalised to ``False`` (Megatron-LM does the same in
  its argument checks: sequence parallelism shards along the TP group, which has one rank).
* ``global_batch`` left out defaults to ``dp * micro_batch * pp`` (one micro-batch per pipeline
  stage per DP rank, the smallest batch that fills a pipeline and satisfies the interleaved rule).
* ``context`` left out (0) means ``seq`` (prefill of ``seq`` tokens, or decode at KV length ``seq``).
* Data-parallel gradient buckets: ``ddp_style="megatron"`` resolves ``dp_bucket_bytes=None`` to
  Megatron-Core's default of ``max(40_000_000, 1_000_000 * dp * cp)`` *elements* per bucket
  (``DistributedDataParallelConfig.bucket_size``; larger DP groups get larger buckets so ring
  chunks stay bandwidth bound), and to a single bucket when ``overlap_grad_reduce`` is off;
  ``ddp_style="torch"`` resolves to PyTorch DDP's ``bucket_cap_mb=25`` MiB with a first bucket of
  ``dist._DEFAULT_FIRST_BUCKET_BYTES`` = 1 MiB. See :meth:`ParallelPlan.dp_buckets_bytes`.
"""

from __future__ import annotations

from math import ceil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tensorstage.errors import SpecError
from tensorstage.fileio import read_text_file
from tensorstage.limits import MAX_WORLD, int_problem
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel.apply import ParamSharding, param_sharding
from tensorstage.parallel.mesh import Mesh

Schedule = Literal["gpipe", "1f1b", "interleaved", "zb-h1"]
Recompute = Literal["none", "selective", "full"]
DType = Literal["bf16", "fp16", "fp8", "fp32"]
Phase = Literal["train", "prefill", "decode"]
CPMode = Literal["ring", "allgather"]
DDPStyle = Literal["megatron", "torch"]
FSDPReshard = Literal["default", "true", "false"]
AttentionImpl = Literal["flash", "materialized"]
AttentionFlops = Literal["causal_half", "full"]
RecomputeModule = Literal["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]
RECOMPUTE_MODULES: tuple[str, ...] = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe",
                                      "shared_experts")

#: Numeric plan fields; a YAML ``true``/``false`` in one of them is an error, not 1/0.
NUMERIC_FIELDS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "zero", "seq", "global_batch", "micro_batch",
                  "dp_bucket_bytes", "zero_shard_size", "fsdp_prefetch", "context", "capacity_factor",
                  "routing_skew")

BASE_AXES = ("tp", "cp", "dp", "pp")
DEFAULT_RANK_ORDER = BASE_AXES
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}

# Megatron-Core DDP: default bucket = max(40M, 1M * dp_cp_size) elements (with overlap_grad_reduce).
MEGATRON_BUCKET_MIN_ELEMS = 40_000_000
MEGATRON_BUCKET_ELEMS_PER_DP_RANK = 1_000_000
# PyTorch DDP: bucket_cap_mb default 25 MiB; the first (last-layer) bucket is 1 MiB.
TORCH_DDP_BUCKET_BYTES = 25 * 1024 * 1024
TORCH_DDP_FIRST_BUCKET_BYTES = 1024 * 1024
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) * TP.
MEGATRON_VOCAB_DIVISOR = 128

EXPERT_VIEW = "expert"
HSDP_VIEW = "hsdp"


class ParallelPlan(BaseModel):
    """Degrees of each parallelism, the pipeline schedule, batch shape and numerics of one run.

    Degrees: ``tp`` tensor, ``pp`` pipeline, ``dp`` data, ``cp`` context (sequence split of
    attention), ``ep`` expert (carved out of ``dp * cp``: it adds no ranks), ``vpp`` virtual
    pipeline stages (model chunks) per PP rank. ``world = tp * cp * dp * pp``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int = Field(1, ge=1, description="tensor-parallel degree")
    pp: int = Field(1, ge=1, description="pipeline-parallel degree (stages)")
    dp: int = Field(1, ge=1, description="data-parallel degree")
    cp: int = Field(1, ge=1, description="context-parallel degree")
    ep: int = Field(1, ge=1, description="expert-parallel degree, carved out of dp*cp (of tp*cp*dp with etp 1)")
    etp: int | None = Field(
        None, ge=1,
        description="expert tensor-parallel degree: tp (default: experts split like the dense MLP) or 1 "
        "(Megatron MoE parallel folding: experts whole, EP laid over tp*cp*dp, so ep may exceed dp*cp)")
    vpp: int = Field(1, ge=1, description="virtual pipeline stages (model chunks) per PP rank")
    sp: bool = Field(False, description="Megatron sequence parallelism over the TP group")
    zero: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage: 1 optimizer, 2 +grads, 3 +params (FSDP)")
    schedule: Schedule = "1f1b"
    recompute: Recompute = "none"
    recompute_modules: tuple[RecomputeModule, ...] | None = Field(
        None,
        description="with recompute selective: the submodules re-run in backward (Megatron-Core "
        "--recompute-modules: core_attn, moe_act, layernorm, mla_up_proj, mlp, moe, shared_experts); "
        "None = Megatron's default, core_attn",
    )
    seq: int = Field(2048, ge=1, description="sequence length in tokens (decode: one new token per "
                     "sequence; KV length when context is 0)")
    global_batch: int = Field(0, ge=0, description="sequences per step; 0 = dp*micro_batch*pp")
    micro_batch: int = Field(1, ge=1, description="sequences per micro-batch per DP rank")
    dtype: DType = "bf16"
    rank_order: tuple[str, ...] = DEFAULT_RANK_ORDER
    # --- extras ------------------------------------------------------------------------------
    ddp_style: DDPStyle = "megatron"
    dp_bucket_bytes: int | None = Field(
        None, ge=1, description="gradient bucket size; None = ddp_style default"
    )
    overlap_grad_reduce: bool = True
    zero_shard_size: int | None = Field(
        None,
        ge=1,
        description="hybrid sharding: shard over groups of this many dp*cp ranks, replicate across",
    )
    fsdp_prefetch: int = Field(1, ge=0, description="FSDP/ZeRO-3 units whose all-gather is issued ahead")
    fsdp_reshard_after_forward: FSDPReshard = Field(
        "default",
        description="ZeRO-3/FSDP2 reshard_after_forward: default = torch's None (layers True, root "
        "= embedding+head False), true = every unit (root too), false = none",
    )
    overlap_param_gather: bool = Field(
        False,
        description="ZeRO-1/2: all-gather updated params during the next forward (Megatron "
        "overlap_param_gather; default off as in Megatron-core: all-gather right after the step)",
    )
    moe_dispatch_fp8: bool = Field(
        False,
        description="expert-parallel all-to-alls toward the experts in FP8 with per-128 scales, combines "
        "in the activation dtype (DeepSeek-V3's low-precision communication); needs dtype fp8 and ep > 1",
    )
    moe_a2a_overlap: bool = Field(
        False,
        description="overlap each micro-batch's backward with the next one's forward, block by block, so that "
        "each one's expert-parallel all-to-alls run under the other's compute (Megatron-Core "
        "overlap_moe_expert_parallel_comm, combined 1F1B); needs ep > 1 and pp 1",
    )
    tp_comm_overlap: bool = Field(
        False,
        description="Megatron-Core --tp-comm-overlap (Transformer Engine userbuffers): SP all-gather / "
        "reduce-scatter over tp pipelined with the GEMM they feed / drain; needs tp > 1 and sp",
    )
    cp_mode: CPMode = "ring"
    phase: Phase = "train"
    context: int = Field(0, ge=0, description="KV length for decode; 0 = seq")
    capacity_factor: float | None = Field(None, gt=0, description="MoE capacity factor; None = dropless")
    routing_skew: float = Field(1.0, ge=1.0, description="tokens at the busiest expert rank / the mean")
    pp_layer_split: tuple[int, ...] | None = None
    # --- graph conventions (None = not given: the caller's GraphOptions, else its default) -------
    attention_impl: AttentionImpl | None = Field(
        None, description="flash (fused kernel) | materialized (eager softmax, saves probabilities)"
    )
    attention_flops: AttentionFlops | None = Field(
        None, description="causal_half (Megatron-Core) | full (no halving for the causal mask)"
    )
    dropout: bool | None = Field(None, description="model the dropout layers (masks saved for backward)")
    megatron_fusions: bool | None = Field(
        None, description="Megatron-LM fused element-wise kernels (bias-dropout-add, bias-GeLU, ...)"
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: object) -> object:
        """Fill derived defaults before freezing, so dumps show the values actually used."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if not data.get("global_batch"):
            dp, mb, pp = (data.get(k, 1) for k in ("dp", "micro_batch", "pp"))
            if all(isinstance(v, int) for v in (dp, mb, pp)):
                data["global_batch"] = dp * mb * pp
        if isinstance(data.get("fsdp_reshard_after_forward"), bool):  # YAML true/false
            data["fsdp_reshard_after_forward"] = str(data["fsdp_reshard_after_forward"]).lower()
        if isinstance(data.get("rank_order"), str):
            data["rank_order"] = split_rank_order(data["rank_order"])
        if isinstance(data.get("recompute_modules"), str):  # "moe_act,layernorm", as the flag takes it
            data["recompute_modules"] = tuple(x.strip() for x in data["recompute_modules"].split(",") if x.strip())
        if isinstance(data.get("recompute_modules"), (list, tuple)):  # each once, in the order given
            data["recompute_modules"] = tuple(dict.fromkeys(data["recompute_modules"]))
        if isinstance(data.get("pp_layer_split"), str):  # YAML "7,8,8,7", as the flag takes it
            data["pp_layer_split"] = tuple(x.strip() for x in data["pp_layer_split"].split(",") if x.strip())
        return data

    @field_validator(*NUMERIC_FIELDS, mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: object) -> object:
        """Reject ``tp: true`` and the like: pydantic would read it as 1, silently (YAML typo); and
        integers beyond int64 (:mod:`tensorstage.limits`)."""
        problem = int_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("sp")
    @classmethod
    def _sp_needs_tp(cls, sp: bool, info: ValidationInfo) -> bool:
        """``sp`` with ``tp == 1`` is a no-op, as Megatron-LM (module docstring); checked after
        ``sp`` itself is validated so a value like ``sp: maybe`` is still rejected."""
        return sp and info.data.get("tp") != 1

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def check_field(cls, name: str, value: Any, where: str = "plan") -> Any:
        """``value`` validated and coerced as plan field ``name`` alone (``"false"`` -> False, a list
        -> a tuple), for callers that pin some fields before the rest of the plan exists (a search
        space's ``fixed`` values); one :class:`SpecError` naming ``where.name`` otherwise. Checks that
        need other fields (``plan.check()``) run when the whole plan is parsed. ``where=""`` names
        the field alone (an option of its own, such as ``--dtype``)."""
        if name not in cls.model_fields:
            raise SpecError(f"{where}.{name}" if where else name, "unknown plan key", cls.model_fields)
        probe = cls.model_construct(tp=2)  # sp's validator keeps sp only beside tp > 1
        # the whole-plan pre-pass first: it reads YAML's false as "false", splits "tp,dp,pp,cp", ...
        if name != "global_batch":  # (the pre-pass fills a missing or zero global batch: not here)
            value = cls._defaults({name: value}).get(name, value)  # type: ignore[operator, union-attr]
        try:
            cls.__pydantic_validator__.validate_assignment(probe, name, value)
        except ValidationError as exc:
            err = _plan_error(exc, where or "plan")
            raise (SpecError(name, err.reason, err.allowed) if not where else err) from None
        return getattr(probe, name)

    @classmethod
    def parse(cls, data: dict, where: str = "plan") -> ParallelPlan:
        """Validate a plain dict into a checked plan; any problem is one :class:`SpecError`."""
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise SpecError(f"{where}.{unknown[0]}", "unknown plan key", cls.model_fields)
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            raise _plan_error(exc, where) from None
        plan.check()
        return plan

    # --- derived -------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        """Ranks the plan occupies: ``tp * cp * dp * pp`` (EP re-uses DP x CP ranks)."""
        return self.tp * self.cp * self.dp * self.pp

    @property
    def microbatches(self) -> int:
        """Micro-batches per step per pipeline (gradient-accumulation steps)."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def folded(self) -> bool:
        """Megatron's MoE parallel folding: expert TP 1 under TP > 1, so EP spans the TP ranks too
        (the expert layers re-factor ``tp * cp * dp`` as ``ep * edp``; attention keeps TP/CP/DP)."""
        return self.tp > 1 and self.etp == 1

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel degree: ``tp``, or 1 when folded."""
        return 1 if self.folded else self.tp

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: replicas of each expert, ``dp * cp / ep`` (Megatron), or
        ``tp * cp * dp / ep`` when folded."""
        return (self.tp if self.folded else 1) * self.dp * self.cp // self.ep

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_len(self) -> int:
        """KV length attention reads: ``context`` (decode) or ``seq``."""
        return self.context or self.seq

    def padded_vocab(self, vocab: int) -> int:
        """Megatron's padded vocabulary: next multiple of ``128 * tp`` (so vocab-parallel shards are equal)."""
        div = MEGATRON_VOCAB_DIVISOR * self.tp
        return ceil(vocab / div) * div

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Layers of each virtual stage ``v = chunk * pp + pp_rank`` (Megatron interleaved order:
        with pp=4, vpp=2, 16 layers, rank 0 holds layers 0-1 and 8-9)."""
        stages = self.pp * self.vpp
        if self.pp_layer_split is not None:
            return list(self.pp_layer_split)
        return [num_layers // stages] * stages

    def stage_layers(self, num_layers: int, pp_rank: int, chunk: int = 0) -> range:
        """Global layer indices held by model chunk ``chunk`` of pipeline rank ``pp_rank``."""
        split = self.layers_per_stage(num_layers)
        v = chunk * self.pp + pp_rank
        start = sum(split[:v])
        return range(start, start + split[v])

    def dp_buckets_bytes(self, grad_elem_bytes: int) -> tuple[int | None, int | None]:
        """``(first_bucket_bytes, bucket_bytes)`` for the gradient reduction; ``None`` = unbounded.

        Megatron: ``bucket_size`` elements ``max(40M, 1M * dp * cp)`` times the grad element size, no
        special first bucket; one bucket for everything when ``overlap_grad_reduce`` is off.
        Torch DDP: 25 MiB buckets, first bucket 1 MiB. An explicit ``dp_bucket_bytes`` replaces the
        (non-first) bucket size in both styles.
        """
        if self.ddp_style == "torch":
            return TORCH_DDP_FIRST_BUCKET_BYTES, self.dp_bucket_bytes or TORCH_DDP_BUCKET_BYTES
        if not self.overlap_grad_reduce:
            return None, None
        if self.dp_bucket_bytes is not None:
            return None, self.dp_bucket_bytes
        elems = max(MEGATRON_BUCKET_MIN_ELEMS, MEGATRON_BUCKET_ELEMS_PER_DP_RANK * self.dp * self.cp)
        return None, elems * grad_elem_bytes

    # --- mesh ----------------------------------------------------------------------------------
    def axis_order(self) -> list[str]:
        """Base axes innermost first: ``rank_order`` without ``ep``. A size-1 ``cp`` or ``dp`` is
        moved next to the other (size-1 axes have no effect on rank arithmetic), so the expert
        view can always re-factor a contiguous run."""
        order = [a for a in self.rank_order if a != "ep"]
        for lone, other in (("cp", "dp"), ("dp", "cp")):
            if getattr(self, lone) == 1 and abs(order.index(lone) - order.index(other)) != 1:
                order.remove(lone)
                order.insert(order.index(other), lone)
        return order

    def _ep_inner(self) -> bool:
        """EP varies faster than EDP unless ``rank_order`` lists ``ep`` after ``dp`` (Megatron's
        expert generator uses the same order string with cp=1 and dp=edp)."""
        order = list(self.rank_order)
        return "ep" not in order or order.index("ep") < order.index("dp")

    def mesh(self) -> Mesh:
        """The :class:`Mesh` of this plan: base view ``rank_order`` (default ``tp, cp, dp, pp``),
        view ``"expert"`` = the ``cp, dp`` run re-factored as ``ep, edp`` (EP inner by default, as
        Megatron's ``tp-cp-ep-dp-pp``; expert TP = TP; present even when ep = 1, so expert weights
        always reduce gradients over ``edp``), and when ``zero_shard_size`` is set, view
        ``"hsdp"`` = the run re-factored as ``dp_shard, dp_replicate`` (shard inner)."""
        self.check()
        order = self.axis_order()
        sizes = [(a, getattr(self, a)) for a in order]
        i, j = sorted((order.index("cp"), order.index("dp")))
        run = order[i : j + 1]
        refactor: dict = {}
        new = [("ep", self.ep), ("edp", self.edp)]
        # folded: the expert view re-factors tp too (tp sits next to the cp/dp run: checked)
        expert_run = order[i - 1 : j + 1] if self.folded else run
        refactor[EXPERT_VIEW] = (expert_run, new if self._ep_inner() else new[::-1])
        if self.zero_shard_size is not None and self.zero_shard_size < self.dp * self.cp:
            reps = self.dp * self.cp // self.zero_shard_size
            refactor[HSDP_VIEW] = (run, [("dp_shard", self.zero_shard_size), ("dp_replicate", reps)])
        return Mesh.create(sizes, refactor)

    def dp_axes(self, expert: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(shard_axes, replicate_axes)`` of the data-parallel domain of a weight, for
        :func:`tensorstage.parallel.apply.param_sharding`: dense weights are replicated over ``cp``
        and ``dp`` (Megatron's dp-cp group; CP ranks hold the same weights), size-1 axes left out,
        or over ``dp_shard`` / ``dp_replicate`` with hybrid sharding; expert weights over ``edp``."""
        if expert:
            return ("edp",), ()
        if self.zero_shard_size is not None and self.zero_shard_size < self.dp * self.cp:
            return ("dp_shard",), ("dp_replicate",)
        order = self.axis_order()
        return tuple(a for a in order if a in ("cp", "dp") and getattr(self, a) > 1) or ("dp",), ()

    def param_sharding(
        self, weight_dims: tuple[str, ...], model_parallel: dict | None = None, expert: bool = False
    ) -> ParamSharding:
        """Placements of a weight through a step under this plan's ZeRO stage and DP axes; pass the
        weight's TP/EP placements (from :mod:`tensorstage.parallel.apply`) as ``model_parallel``."""
        shard, replicate = self.dp_axes(expert)
        return param_sharding(weight_dims, self.zero, shard, replicate, model_parallel)

    # --- rules ---------------------------------------------------------------------------------
    def check(self, world: int | None = None) -> None:
        """Rules that need only the plan; raises a one-line :class:`SpecError` naming the rule."""
        names = [a for a in self.rank_order if a != "ep"]
        if sorted(names) != sorted(BASE_AXES) or self.rank_order.count("ep") > 1:
            raise SpecError(
                "rank_order",
                f"must list each of tp, cp, dp, pp once (ep optional), got {list(self.rank_order)}",
                BASE_AXES,
            )
        if "ep" in self.rank_order:
            order = list(self.rank_order)
            k = order.index("ep")
            if not {order[k - 1] if k else "", order[k + 1] if k + 1 < len(order) else ""} & {"cp", "dp"}:
                raise SpecError("rank_order", "ep must sit next to cp or dp (EP is carved out of dp*cp)")
        order = self.axis_order()
        if self.cp > 1 and self.dp > 1 and abs(order.index("cp") - order.index("dp")) != 1:
            raise SpecError(
                "rank_order",
                "cp and dp must be adjacent (expert parallelism and hybrid sharding are carved out of dp*cp)",
            )
        if self.world > MAX_WORLD:
            raise SpecError(
                "world",
                f"tp*cp*dp*pp = {self.tp}*{self.cp}*{self.dp}*{self.pp} = {self.world:,} ranks; at most "
                f"{MAX_WORLD:,} are supported (tensorstage.limits)",
            )
        if world is not None and world != self.world:
            raise SpecError(
                "world",
                f"plan needs tp*cp*dp*pp = {self.tp}*{self.cp}*{self.dp}*{self.pp} = {self.world} "
                f"ranks but world size is {world}",
            )
        if self.etp is not None and self.etp not in (1, self.tp):
            raise SpecError("etp", f"etp={self.etp} must be 1 (MoE parallel folding) or tp={self.tp}",
                            allowed=[1, self.tp])
        if self.folded:
            if order.index("tp") + 1 != min(order.index("cp"), order.index("dp")):
                raise SpecError("rank_order", "etp 1 (MoE parallel folding) needs tp next to the cp/dp axes")
            if self.ep % self.tp or (self.tp * self.dp * self.cp) % self.ep:
                raise SpecError(
                    "ep",
                    f"with etp 1 (MoE parallel folding) ep={self.ep} must be a multiple of tp={self.tp} and divide "
                    f"tp*dp*cp={self.tp * self.dp * self.cp} (EP groups hold whole TP groups)",
                )
            if not self.sp and self.phase != "decode":
                raise SpecError("sp", "etp 1 (MoE parallel folding) with tp > 1 needs sequence parallelism "
                                "(each TP rank dispatches its own sequence shard), give --sp")
        elif (self.dp * self.cp) % self.ep:
            raise SpecError(
                "ep", f"ep={self.ep} must divide dp*cp={self.dp * self.cp} (EP is carved out of DP x CP; "
                "etp 1 lays it over tp*dp*cp)"
            )
        if self.global_batch % (self.dp * self.micro_batch):
            raise SpecError(
                "global_batch",
                f"global_batch={self.global_batch} must be divisible by "
                f"dp*micro_batch={self.dp}*{self.micro_batch}={self.dp * self.micro_batch}",
            )
        if self.vpp > 1 and self.schedule != "interleaved":
            raise SpecError("vpp", f"vpp={self.vpp} > 1 requires schedule interleaved, got {self.schedule}")
        if self.schedule == "interleaved":
            if self.vpp < 2 or self.pp < 2:
                raise SpecError(
                    "schedule", f"interleaved needs pp > 1 and vpp > 1, got pp={self.pp} vpp={self.vpp}"
                )
            if self.microbatches % self.pp:
                raise SpecError(
                    "global_batch",
                    f"interleaved schedule needs microbatches ({self.microbatches}) "
                    f"divisible by pp={self.pp} (Megatron rule)",
                )
        if self.context and self.phase != "decode":  # would be ignored: train/prefill attend over seq
            raise SpecError(
                "context", f"context={self.context} applies only to phase decode, got phase {self.phase}; "
                "train and prefill attend over seq"
            )
        if self.dropout and self.phase != "train":  # would be ignored: inference runs without dropout
            raise SpecError("dropout", f"applies only to phase train, got phase {self.phase}")
        if self.phase == "decode":
            if self.kv_len % self.cp:
                raise SpecError(
                    "context", f"decode KV length {self.kv_len} must be divisible by cp={self.cp}"
                )
        else:
            if self.seq % self.cp:
                raise SpecError("seq", f"seq={self.seq} must be divisible by cp={self.cp}")
            if self.cp > 1 and self.cp_mode == "ring" and self.seq % (2 * self.cp):
                raise SpecError(
                    "seq",
                    f"seq={self.seq} must be divisible by 2*cp={2 * self.cp} for causal load "
                    "balancing of ring attention (each rank holds chunks i and 2cp-1-i)",
                )
            if self.sp and (self.seq // self.cp) % self.tp:
                raise SpecError(
                    "seq",
                    f"sequence parallelism needs seq/cp={self.seq // self.cp} divisible by tp={self.tp}",
                )
        if self.overlap_param_gather and self.zero not in (1, 2):
            raise SpecError(
                "overlap_param_gather",
                f"overlapping the post-step parameter all-gather needs the distributed optimizer "
                f"(zero 1 or 2), got zero={self.zero}",
            )
        if self.recompute_modules is not None and not self.recompute_modules:
            raise SpecError("recompute_modules", "give at least one module (or leave it out for core_attn)",
                            RECOMPUTE_MODULES)
        if self.recompute_modules is not None and self.recompute != "selective":
            raise SpecError(
                "recompute_modules",
                f"chooses what selective recompute re-runs; add recompute: selective (got {self.recompute})",
            )
        if self.moe_dispatch_fp8 and (self.ep < 2 or self.dtype != "fp8"):
            raise SpecError(
                "moe_dispatch_fp8",
                f"FP8 expert dispatch needs ep > 1 and dtype fp8 (the experts' FP8 GEMMs take the FP8 rows), "
                f"got ep={self.ep} dtype={self.dtype}",
            )
        if self.moe_a2a_overlap and (self.ep < 2 or self.phase != "train" or self.pp > 1):
            raise SpecError(
                "moe_a2a_overlap",
                f"overlapping the expert-parallel all-to-alls is modelled for training steps with ep > 1 and "
                f"no pipeline (pp 1) so far, got ep={self.ep} pp={self.pp} phase={self.phase}",
            )
        if self.tp_comm_overlap and (self.tp < 2 or not self.sp):
            raise SpecError(
                "tp_comm_overlap",
                f"overlapping TP communication with GEMMs needs tp > 1 and sp (Megatron requires "
                f"--sequence-parallel), got tp={self.tp} sp={self.sp}",
            )
        if self.zero_shard_size is not None and self.zero == 0:  # nothing is sharded: would be ignored
            raise SpecError("zero_shard_size", "hybrid sharding needs zero 1, 2 or 3, got zero=0")
        if self.fsdp_reshard_after_forward != "default" and self.zero != 3:
            raise SpecError(
                "fsdp_reshard_after_forward",
                f"applies only to zero 3 (FSDP), got zero={self.zero}",
            )
        if self.zero_shard_size is not None and (self.dp * self.cp) % self.zero_shard_size:
            raise SpecError(
                "zero_shard_size", f"{self.zero_shard_size} must divide dp*cp={self.dp * self.cp}"
            )
        if self.pp_layer_split is not None:
            if len(self.pp_layer_split) != self.pp * self.vpp:
                raise SpecError(
                    "pp_layer_split",
                    f"needs pp*vpp={self.pp * self.vpp} entries, got {len(self.pp_layer_split)}",
                )
            if min(self.pp_layer_split) < 0:
                raise SpecError("pp_layer_split", "layer counts must be >= 0")

    def validate_for(self, model: ModelSpec, world: int | None = None) -> None:
        """All plan rules plus the rules against ``model`` (and ``world`` if given)."""
        self.check(world)
        tp = self.tp
        if model.num_heads % tp:
            raise SpecError("tp", f"num_heads={model.num_heads} of {model.name} must be divisible by tp={tp}")
        if model.mla is None and model.kv_heads % tp:
            raise SpecError(
                "tp",
                f"num_kv_heads={model.kv_heads} of {model.name} must be divisible by tp={tp} "
                "(Megatron shards query groups; MLA models need only heads)",
            )
        if model.ffn % tp and (model.moe is None or model.moe.dense_layers):
            raise SpecError("tp", f"ffn={model.ffn} of {model.name} must be divisible by tp={tp}")
        if model.moe is not None:
            if model.moe.num_experts % self.ep:
                raise SpecError(
                    "ep",
                    f"num_experts={model.moe.num_experts} of {model.name} must be divisible by ep={self.ep}",
                )
            if model.moe.expert_ffn % tp:
                raise SpecError(
                    "tp", f"expert_ffn={model.moe.expert_ffn} must be divisible by expert TP = tp={tp}"
                )
            # the busiest EP rank gets at most every token, each sending it min(top_k, experts per
            # rank) copies: load / mean <= min(ep, num_experts / top_k); above that is no routing at all
            max_skew = min(self.ep, model.moe.num_experts / model.moe.top_k)
            if self.routing_skew > max_skew:
                raise SpecError(
                    "routing_skew",
                    f"{self.routing_skew:g} > {max_skew:g}, the most any routing can put on one EP rank "
                    f"(min(ep, num_experts/top_k) = "
                    f"min({self.ep}, {model.moe.num_experts}/{model.moe.top_k}))",
                )
        elif self.ep > 1:
            raise SpecError("ep", f"ep={self.ep} > 1 but {model.name} has no experts")
        elif self.etp is not None and self.etp != self.tp:  # expert TP of a model without experts
            raise SpecError("etp", f"etp={self.etp} applies only to MoE models; {model.name} has no experts")
        else:
            for name in ("capacity_factor", "routing_skew"):  # would be ignored on a dense model
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise SpecError(name, f"applies only to MoE models; {model.name} has no experts")
        needs = {"mla_up_proj": (model.mla is not None, "multi-latent attention"),
                 "moe_act": (model.moe is not None, "experts"), "moe": (model.moe is not None, "experts"),
                 "shared_experts": (model.moe is not None and model.moe.shared_experts > 0, "shared experts")}
        for module in self.recompute_modules or ():
            ok, what = needs.get(module, (True, ""))
            if not ok:
                raise SpecError("recompute_modules", f"{module} needs a model with {what}; {model.name} has none",
                                RECOMPUTE_MODULES)
        layers, stages = model.num_layers, self.pp * self.vpp
        if self.pp_layer_split is None:
            if layers % stages:
                raise SpecError(
                    "pp",
                    f"num_layers={layers} must be divisible by pp*vpp={self.pp}*{self.vpp}={stages}; "
                    "give pp_layer_split for an uneven split",
                )
        elif sum(self.pp_layer_split) != layers:
            raise SpecError(
                "pp_layer_split", f"sums to {sum(self.pp_layer_split)}, model has {layers} layers"
            )
        if model.positions == "learned" and max(self.seq, self.kv_len) > model.max_seq:
            raise SpecError(
                "seq", f"{max(self.seq, self.kv_len)} tokens exceed learned positions max_seq={model.max_seq}"
            )

    def summary(self) -> dict[str, object]:
        """The plan as a plain dict plus derived values, for manifests and ``--json`` output."""
        out: dict[str, object] = self.model_dump(mode="json")
        out.update(world=self.world, microbatches=self.microbatches, edp=self.edp)
        return out


def split_rank_order(text: str) -> tuple[str, ...]:
    """``"tp,cp,dp,pp"`` or Megatron's ``"tp-cp-ep-dp-pp"`` -> axis names, innermost first."""
    return tuple(a.strip().lower() for a in text.replace("-", ",").split(",") if a.strip())


def _plan_error(exc: ValidationError, where: str) -> SpecError:
    """First pydantic error as a one-line :class:`SpecError`, listing allowed values for choices."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = ".".join([where, *loc[:1]]) if loc else where
    allowed = _ALLOWED.get(loc[0]) if loc else None
    if allowed is None and str(err.get("type", "")).startswith("bool_"):
        allowed = ("true", "false")  # what a boolean field takes (YAML / flag spellings)
    msg = err.get("msg", "invalid value")
    msg = "not an allowed value" if allowed else msg.removeprefix("Value error, ")
    return SpecError(field, f"{msg}, got {err.get('input')!r}", allowed)


_ALLOWED: dict[str, tuple[object, ...]] = {
    "schedule": ("gpipe", "1f1b", "interleaved", "zb-h1"),
    "recompute": ("none", "selective", "full"),
    "dtype": tuple(DTYPE_BYTES),
    "zero": (0, 1, 2, 3),
    "phase": ("train", "prefill", "decode"),
    "cp_mode": ("ring", "allgather"),
    "ddp_style": ("megatron", "torch"),
    "fsdp_reshard_after_forward": ("default", "true", "false"),
    "attention_impl": ("flash", "materialized"),
    "attention_flops": ("causal_half", "full"),
    "recompute_modules": RECOMPUTE_MODULES,
}


def read_plan_yaml(path: str | Path) -> dict[str, object]:
    """The mapping in a plan YAML file, unchecked. Malformed YAML, a missing file or a non-mapping
    is one :class:`SpecError` whose field is ``file:line``; an unknown key names the key, its line
    and the allowed keys. Keys may be spelled as the flags (``global-batch`` = ``global_batch``)."""
    path = Path(path)
    text = read_text_file(path, "plan file")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{line}", f"malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or root is None:
        raise SpecError(f"{path}:1", "plan file must be a mapping of plan keys to values")
    for key_node, _ in root.value:
        if _plan_key(key_node.value) not in ParallelPlan.model_fields:
            raise SpecError(
                f"{path}:{key_node.start_mark.line + 1}",
                f"unknown plan key {key_node.value!r}",
                ParallelPlan.model_fields,
            )
    return {_plan_key(k): v for k, v in data.items()}


def _plan_key(key: object) -> object:
    """A YAML key as a plan field: the flag spelling (``global-batch``) is accepted, since the
    ``-c`` help says the keys are the flag names."""
    return key.replace("-", "_") if isinstance(key, str) else key


def load_plan(path: str | Path, overrides: dict[str, object] | None = None) -> ParallelPlan:
    """Load and check a plan YAML; ``overrides`` (e.g. explicit CLI flags) replace file values."""
    data = read_plan_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ParallelPlan.parse(data, where=str(path))
