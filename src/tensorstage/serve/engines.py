"""Engine profiles: each serving engine's scheduler knobs at its documented defaults.

A profile is data (``profiles.yaml``, a source per number) plus one of two scheduling policies
implemented in :mod:`tensorstage.serve.replica`: ``continuous`` (iteration-level batching with a
token budget, paged KV and preemption by recompute: vLLM, SGLang, TensorRT-LLM in-flight batching)
and ``static`` (a batch runs prefill then decode to completion before the next is admitted:
TensorRT-LLM's gptSession). Engines differ by tens of percent on the same GPUs; what differs here
is explicit (token budget, max sequences, KV block size, chunked prefill, prefix cache, KV memory
fraction, CUDA graphs, exposed scheduler CPU time per step), never fitted per case.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from importlib.resources import files
from typing import Any

import yaml

from tensorstage.errors import SpecError

POLICIES = ("continuous", "static")


@dataclass(frozen=True)
class EngineProfile:
    """Scheduler parameters of one engine (see ``profiles.yaml`` for each number's source).

    ``max_num_batched_tokens`` = 0 means no token budget (a static batch prefills at once).
    """

    name: str
    policy: str
    max_num_batched_tokens: int
    max_num_seqs: int
    block_tokens: int
    chunked_prefill: bool
    prefix_caching: bool
    kv_mem_fraction: float
    cuda_graph: bool
    cuda_graph_max_batch: int
    scheduler_cpu_s: float
    cuda_graph_kernel_gap_s: float = 1e-6
    #: admit a request only with KV blocks for its whole prompt + output reserved, so running
    #: requests are never preempted (TensorRT-LLM's default GUARANTEED_NO_EVICT capacity scheduler);
    #: False: blocks as tokens arrive, preemption by recompute when they run out (vLLM, SGLang)
    kv_reserve_full: bool = False
    #: generation attention reads each KV head once for all the query heads that share it (GQA/MQA
    #: aware kernels: TensorRT-LLM XQA, FlashInfer, FlashAttention decode); False: one thread block
    #: per (sequence, query head) streams its KV head's cache, so a GQA group's KV is read once per
    #: query head (TensorRT-LLM's masked-MHA kernel, its only generation kernel before release 0.7)
    gqa_kv_reuse: bool = True
    #: a gated MLP's gate and up projections run as one GEMM (vLLM / SGLang MergedColumnParallelLinear,
    #: TensorRT-LLM's PyTorch backend); False: two GEMMs (TensorRT-LLM's TRT-engine GatedMLP, 0.5-0.7)
    fused_gate_up: bool = True
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def check(self) -> EngineProfile:
        """Raise a one-line :class:`SpecError` naming the first bad field."""
        if self.policy not in POLICIES:
            raise SpecError("engine.policy", f"unknown policy {self.policy!r}", POLICIES)
        for name in ("max_num_seqs", "block_tokens"):
            if getattr(self, name) < 1:
                raise SpecError(f"engine.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < 0:
            raise SpecError("engine.max_num_batched_tokens", "must be >= 0 (0 = no budget)")
        if not 0 < self.kv_mem_fraction <= 1:
            raise SpecError("engine.kv_mem_fraction", f"must be in (0, 1], got {self.kv_mem_fraction}")
        if self.scheduler_cpu_s < 0:
            raise SpecError("engine.scheduler_cpu_s", "must be >= 0")
        return self

    def with_overrides(self, **overrides: Any) -> EngineProfile:
        """A copy with the non-None ``overrides`` applied (and checked)."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise SpecError("engine", f"unknown profile field {bad[0]!r}", sorted(known - {"sources", "name"}))
        vals = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **vals).check() if vals else self


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return yaml.safe_load(files("tensorstage.serve").joinpath("profiles.yaml").read_text())


def engine_names() -> list[str]:
    """Names of the bundled profiles."""
    return [k for k, v in _table().items() if isinstance(v, dict)]


def load_profile(name: str, **overrides: Any) -> EngineProfile:
    """The bundled profile ``name`` with ``overrides`` (None values ignored)."""
    table = _table()
    data = table.get(str(name).lower())
    if not isinstance(data, dict):
        raise SpecError("engine", f"unknown engine {name!r}", engine_names())
    prof = EngineProfile(name=str(name).lower(), cuda_graph_kernel_gap_s=float(table["cuda_graph_kernel_gap_s"]),
                         **data).check()
    return prof.with_overrides(**overrides)


__all__ = ["POLICIES", "EngineProfile", "engine_names", "load_profile"]
