"""`ModelSpec`: the architecture of a decoder-only transformer, nothing about ranks or graphs.

One spec covers dense GPT/Llama-style models, grouped-query attention, mixture-of-experts
(routed + shared experts, dense layers interleaved) and multi-head latent attention (MLA, as in
DeepSeek-V3). Parameter counts are closed forms over these fields; the graph package builds
the same weights tensor by tensor, and the tests check that the two agree.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from tensorstage.errors import SpecError
from tensorstage.limits import MAX_LAYERS, int_problem

Activation = Literal["gelu", "relu", "swiglu", "geglu"]
Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope", "alibi", "none"]

GATED_ACTIVATIONS = ("swiglu", "geglu")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: object, info: ValidationInfo) -> object:
        """``num_layers: true`` is an error, not 1 (pydantic's lax mode reads a bool as an int), and
        no integer beyond int64 (:mod:`tensorstage.limits`)."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(value, bool) and (annotation is bool or bool in get_args(annotation)):
            return value
        problem = int_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class MoESpec(_Frozen):
    """Mixture-of-experts feed-forward layers.

    ``dense_layers`` lists layer indices whose MLP is a plain dense MLP of width ``ModelSpec.ffn``
    (DeepSeek-V3's first three layers, Qwen's ``mlp_only_layers``). Shared experts are always
    active; their total width is ``shared_experts * shared_expert_ffn``.
    """

    num_experts: int
    top_k: int
    expert_ffn: int
    shared_experts: int = 0
    shared_expert_ffn: int | None = None  # defaults to expert_ffn
    dense_layers: tuple[int, ...] = ()
    router_bias: bool = False
    expert_bias: bool = False
    capacity_factor: float | None = None  # None = dropless
    route_groups: int = 0
    route_topk_groups: int = 0

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.route_groups < 0 or self.route_topk_groups < 0:
            raise ValueError("route_groups and route_topk_groups must be >= 0")
        if self.route_groups and (self.num_experts % self.route_groups or not
                                  1 <= self.route_topk_groups <= self.route_groups):
            raise ValueError("route_groups must divide num_experts and route_topk_groups be in 1..route_groups")
        if self.num_experts < 1:
            raise ValueError("num_experts must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError("top_k must be between 1 and num_experts")
        if self.expert_ffn < 1:
            raise ValueError("expert_ffn must be >= 1")
        return self

    @property
    def shared_ffn_each(self) -> int:
        return self.shared_expert_ffn if self.shared_expert_ffn is not None else self.expert_ffn


class MLASpec(_Frozen):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Queries: optional low-rank path ``hidden -> q_lora_rank -> heads*(nope+rope)`` (``q_lora_rank``
    0 means a full ``hidden -> heads*(nope+rope)`` projection). Keys/values: ``hidden ->
    kv_lora_rank + rope`` (compressed latent plus a shared RoPE key), then ``kv_lora_rank ->
    heads*(nope + v_head_dim)``. The KV cache holds ``kv_lora_rank + qk_rope_head_dim`` per token.
    """

    q_lora_rank: int = 0
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int


class ModelSpec(_Frozen):
    """Architecture of a decoder-only transformer language model."""

    name: str
    family: str = "custom"
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int | None = None  # None = multi-head attention (equal to num_heads)
    head_dim: int | None = None  # None = hidden // num_heads
    ffn: int
    vocab: int
    max_seq: int = 2048
    activation: Activation = "swiglu"
    norm: Norm = "rmsnorm"
    positions: Positions = "rope"
    tied_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attn_sinks: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    # Parallel attention + MLP block (GPT-J, PaLM, GPT-NeoX): x + Attn(Norm(x)) + MLP(Norm'(x)).
    # parallel_norms 1: one norm feeds both branches (GPT-J, PaLM); 2: each branch has its own
    # (GPT-NeoX-20B / Pythia, whose two norms are untied).
    parallel_block: bool = False
    parallel_norms: Literal[1, 2] = 1
    # a norm right after the token embedding (BLOOM's word_embeddings_layernorm)
    embed_norm: bool = False
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        for field in ("num_layers", "hidden", "num_heads", "ffn", "vocab", "max_seq"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1")
        if self.num_layers > MAX_LAYERS:
            raise ValueError(f"num_layers={self.num_layers:,} is above the supported {MAX_LAYERS:,} "
                             "(tensorstage.limits)")
        if self.head_dim is None and self.mla is None and self.hidden % self.num_heads:
            raise ValueError("hidden must be divisible by num_heads when head_dim is not given")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError("num_kv_heads must divide num_heads")
        if self.parallel_norms != 1 and not self.parallel_block:
            raise ValueError("parallel_norms applies only with parallel_block: true")
        if self.moe is not None:
            bad = [i for i in self.moe.dense_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe.dense_layers has indices outside 0..{self.num_layers - 1}: {bad}")
        return self

    # --- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.num_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.is_moe_layer(i))

    @classmethod
    def parse(cls, data: dict, where: str = "model") -> ModelSpec:
        """Validate a plain dict into a spec, turning pydantic's report into one :class:`SpecError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise spec_error_from_pydantic(exc, where) from None


def spec_error_from_pydantic(exc: ValidationError, where: str) -> SpecError:
    """First pydantic error as a one-line :class:`SpecError` naming the dotted field path."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{where}.{loc}" if loc else where
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # pydantic's literal/enum messages already list the allowed values ("Input should be 'a' or 'b'")
    return SpecError(field, msg)
