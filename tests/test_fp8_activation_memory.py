"""FP8 training keeps a linear layer's saved input in FP8 (Transformer Engine's default), closed form.

Llama-3 8B layer, micro-batch 1, sequence 2048, no recompute. Under FP8 the inputs only linear layers
save drop from 2 bytes to 1 per element: the attention input norm's output (read by q/k/v), the MLP
input norm's output (gate/up) and the SwiGLU output (down); the attention output is saved by flash
attention in 16 bits *and* by ``o_proj`` in FP8, one byte more per element. The LM head and the
embedding are not Transformer Engine modules and keep 16-bit inputs.
"""

from __future__ import annotations

from tensorstage.lower import lower_blocks_cached
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan


def _saved(dtype: str) -> dict[str, int]:
    plan = ParallelPlan.parse(dict(tp=1, pp=1, dp=1, seq=2048, global_batch=1, micro_batch=1, recompute="none",
                                   zero=0, dtype=dtype, sp=False))
    _, blocks = lower_blocks_cached(resolve_model("llama3-8b"), plan)
    return {k: b.saved_bytes for k, b in blocks.items()}


def test_fp8_saved_inputs_closed_form():
    b, s, h, f, nh, dh = 1, 2048, 4096, 14336, 32, 128
    bf16, fp8 = _saved("bf16"), _saved("fp8")
    assert bf16["dense"] - fp8["dense"] == (b * s * h + b * s * h + b * s * f) - b * s * nh * dh
    assert bf16["head"] == fp8["head"] and bf16["embedding"] == fp8["embedding"]
