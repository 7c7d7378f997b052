"""Micro-batching, layer assignment, and Megatron's interleaved microbatch order."""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.schedule.microbatch import assign_layers, num_microbatches, rank_layers
from tensorstage.schedule.pipeline import Kind, pipeline_order


def test_num_microbatches() -> None:
    assert num_microbatches(512, 8, 2) == 32
    assert num_microbatches(16, 1, 16) == 1
    for args in [(100, 8, 2), (8, 4, 4), (0, 1, 1)]:
        with pytest.raises(SpecError) as err:
            num_microbatches(*args)
        assert err.value.field == "global_batch"
    with pytest.raises(SpecError) as err:
        num_microbatches(64, 0, 1)
    assert err.value.field == "dp" and ">= 1" in str(err.value)


def test_assign_layers_even_and_interleaved_placement() -> None:
    assert assign_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    ranges = assign_layers(16, 2, 4)  # 8 virtual stages of 2 layers
    assert ranges[5] == range(10, 12)
    # Rank 1 holds virtual stages 1, 3, 5, 7 (chunk c -> stage c*pp + rank).
    assert rank_layers(ranges, 2, 1) == [range(2, 4), range(6, 8), range(10, 12), range(14, 16)]
    assert assign_layers(5, 1) == [range(0, 5)]


def test_assign_layers_uneven_split() -> None:
    # Llama-style: fewer layers on the stages that also hold embedding / head + loss.
    ranges = assign_layers(30, 4, split=[7, 8, 8, 7])
    assert [len(r) for r in ranges] == [7, 8, 8, 7]
    assert ranges[-1] == range(23, 30)
    assert assign_layers(4, 3, split=[0, 4, 0]) == [range(0, 0), range(0, 4), range(4, 4)]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((30, 4, 1, None), "pp"),  # 30 layers not divisible by 4 stages
        ((32, 4, 3, None), "pp"),
        ((30, 4, 1, [7, 8, 8]), "split"),
        ((30, 4, 1, [7, 8, 8, 8]), "split"),
        ((4, 3, 1, [2, 0, 2]), "split"),  # interior stage without layers
        ((0, 1, 1, None), "num_layers"),
    ],
)
def test_assign_layers_errors(args: tuple, field: str) -> None:
    with pytest.raises(SpecError) as err:
        assign_layers(*args)
    assert err.value.field == field


@pytest.mark.parametrize(("pp", "vpp", "m"), [(2, 2, 4), (4, 2, 8), (3, 3, 9), (4, 3, 4)])
def test_interleaved_forward_sequence_is_megatrons_microbatch_groups(pp: int, vpp: int, m: int) -> None:
    # Megatron-LM get_model_chunk_id / microbatch id for virtual microbatch k (m % pp == 0):
    # chunk = (k % (pp*vpp)) // pp, microbatch = (k // (pp*vpp)) * pp + k % pp; backwards use
    # chunk vpp-1-chunk with the same microbatch numbering.
    def mb_chunk(k: int) -> tuple[int, int]:
        return (k // (pp * vpp)) * pp + k % pp, (k % (pp * vpp)) // pp

    for order in pipeline_order("interleaved", pp, m, vpp):
        fwd = [(a.microbatch, a.chunk) for a in order if a.kind is Kind.F]
        bwd = [(a.microbatch, a.chunk) for a in order if a.kind is Kind.B]
        assert fwd == [mb_chunk(k) for k in range(m * vpp)]
        assert bwd == [(mb_chunk(k)[0], vpp - 1 - mb_chunk(k)[1]) for k in range(m * vpp)]


def test_interleaved_warmup_counts() -> None:
    pp, vpp, m = 4, 2, 8
    for rank, order in enumerate(pipeline_order("interleaved", pp, m, vpp)):
        first_b = next(i for i, a in enumerate(order) if a.kind is Kind.B)
        # Megatron: warmup 2(pp-rank-1) + (vpp-1)pp forwards, then one more forward before the first B.
        assert first_b == 2 * (pp - rank - 1) + (vpp - 1) * pp + 1
