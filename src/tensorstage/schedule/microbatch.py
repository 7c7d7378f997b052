"""Micro-batching and layer-to-stage assignment for pipeline parallelism.

The global batch is split over data-parallel replicas, then into micro-batches that flow
through the pipeline one after another (gradient accumulation over them). The model's
transformer layers are split over ``pp * vpp`` virtual stages; the embedding always lives on
the first virtual stage and the LM head + loss on the last one (Megatron), which is why users
often give those stages fewer layers with an explicit uneven split.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorstage.errors import require


def num_microbatches(global_batch: int, dp: int, micro_batch: int) -> int:
    """Micro-batches per pipeline per step: ``global_batch / (dp * micro_batch)``.

    Raises SpecError naming ``global_batch`` unless it is a positive multiple of
    ``dp * micro_batch`` (a fractional micro-batch cannot be scheduled).
    """
    require(dp >= 1, "dp", f"data-parallel degree must be >= 1, got {dp}")
    require(micro_batch >= 1, "micro_batch", f"micro batch must be >= 1, got {micro_batch}")
    per_step = dp * micro_batch
    require(
        global_batch >= per_step and global_batch % per_step == 0,
        "global_batch",
        f"global batch {global_batch} must be a positive multiple of dp*micro_batch = {dp}*{micro_batch}"
        f" = {per_step}",
    )
    return global_batch // per_step


def assign_layers(num_layers: int, pp: int, vpp: int = 1, split: Sequence[int] | None = None) -> list[range]:
    """Transformer layer indices held by each virtual stage ``0 .. pp*vpp-1``.

    Virtual stage ``v`` runs on rank ``v % pp`` as its model chunk ``v // pp``. Without
    ``split`` the layers are divided evenly, which requires ``num_layers % (pp*vpp) == 0``.
    ``split`` gives the layer count of every virtual stage explicitly (it must sum to
    ``num_layers``); the first and last virtual stages may hold 0 layers because they also
    hold the embedding and the head + loss, every other stage needs at least one layer.
    """
    require(pp >= 1, "pp", f"pipeline degree must be >= 1, got {pp}")
    require(vpp >= 1, "vpp", f"virtual stages per rank must be >= 1, got {vpp}")
    require(num_layers >= 1, "num_layers", f"model must have >= 1 layer, got {num_layers}")
    stages = pp * vpp
    if split is None:
        require(
            num_layers % stages == 0,
            "pp",
            f"layers ({num_layers}) must be divisible by pp*vpp = {pp}*{vpp} = {stages}"
            " (or give an explicit uneven split)",
        )
        counts = [num_layers // stages] * stages
    else:
        counts = [int(c) for c in split]
        require(
            len(counts) == stages,
            "split",
            f"split has {len(counts)} entries but pp*vpp = {stages} virtual stages",
        )
        require(
            sum(counts) == num_layers, "split", f"split sums to {sum(counts)}, model has {num_layers} layers"
        )
        for v, c in enumerate(counts):
            edge = v in (0, stages - 1) and stages > 1
            require(
                c >= (0 if edge else 1),
                "split",
                f"virtual stage {v} gets {c} layers; only the first/last stage may be empty",
            )
    ranges: list[range] = []
    lo = 0
    for c in counts:
        ranges.append(range(lo, lo + c))
        lo += c
    return ranges


def rank_layers(ranges: Sequence[range], pp: int, rank: int) -> list[range]:
    """The layer ranges (one per model chunk, chunk order) that pipeline rank ``rank`` holds."""
    return [ranges[v] for v in range(rank, len(ranges), pp)]


__all__ = ["assign_layers", "num_microbatches", "rank_layers"]
