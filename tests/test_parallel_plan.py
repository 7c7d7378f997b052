"""ParallelPlan: derived values, every bad-plan rule's one-line error, YAML loading, Megatron facts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tensorstage.errors import SpecError
from tensorstage.model.spec import MLASpec, ModelSpec, MoESpec
from tensorstage.parallel.plan import ParallelPlan, load_plan

DENSE = ModelSpec(name="d", num_layers=8, hidden=256, num_heads=8, num_kv_heads=2, ffn=512, vocab=1000)
MOE = ModelSpec(
    name="m",
    num_layers=4,
    hidden=128,
    num_heads=4,
    ffn=256,
    vocab=1000,
    moe=MoESpec(num_experts=8, top_k=2, expert_ffn=64),
)
MLA = ModelSpec(
    name="mla",
    num_layers=4,
    hidden=128,
    num_heads=8,
    num_kv_heads=1,
    ffn=256,
    vocab=1000,
    mla=MLASpec(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
)
GPT2 = ModelSpec(
    name="g", num_layers=4, hidden=128, num_heads=4, ffn=512, vocab=1000, positions="learned", max_seq=1024
)


def test_derived_values() -> None:
    p = ParallelPlan.parse(dict(tp=2, pp=4, dp=3, cp=2, ep=2, seq=64, global_batch=48, micro_batch=2))
    assert p.world == 2 * 4 * 3 * 2
    assert p.microbatches == 48 // (3 * 2)
    assert p.edp == 3 * 2 // 2
    # default global batch: dp * micro_batch * pp
    assert ParallelPlan.parse(dict(dp=4, pp=2, micro_batch=3)).global_batch == 24


def test_sp_without_tp_is_normalised_off() -> None:
    assert ParallelPlan.parse(dict(tp=1, sp=True)).sp is False
    assert ParallelPlan.parse(dict(tp=2, sp=True)).sp is True


def test_interleaved_layer_assignment_matches_megatron_docstring() -> None:
    # Megatron initialize_model_parallel docstring: pp=4, vpp=2, 16 layers; GPU 0: [1, 2] [9, 10] (1-based).
    p = ParallelPlan.parse(dict(pp=4, vpp=2, schedule="interleaved", global_batch=8))
    assert list(p.stage_layers(16, 0, 0)) == [0, 1] and list(p.stage_layers(16, 0, 1)) == [8, 9]
    assert list(p.stage_layers(16, 3, 1)) == [14, 15]
    uneven = ParallelPlan.parse(dict(pp=2, pp_layer_split=[3, 5]))
    uneven.validate_for(DENSE)
    assert list(uneven.stage_layers(8, 1)) == [3, 4, 5, 6, 7]


def test_megatron_padded_vocab() -> None:
    # make_vocab_size_divisible_by=128 times TP: GPT-2: 50257 -> 50304 at tp=1; tp=8 pads to a multiple of 1024 -> 51200
    assert ParallelPlan().padded_vocab(50257) == 50304
    assert ParallelPlan.parse(dict(tp=8)).padded_vocab(50257) == 51200


def test_dp_bucket_defaults_megatron_and_torch() -> None:
    # Megatron-Core: max(40M, 1M * dp_cp) elements; none (one bucket) without overlap_grad_reduce.
    assert ParallelPlan.parse(dict(dp=8)).dp_buckets_bytes(2) == (None, 40_000_000 * 2)
    assert ParallelPlan.parse(dict(dp=32, cp=2, seq=64)).dp_buckets_bytes(4) == (None, 64_000_000 * 4)
    assert ParallelPlan.parse(dict(dp=8, overlap_grad_reduce=False)).dp_buckets_bytes(2) == (None, None)
    # torch DDP: bucket_cap_mb=25 MiB, first bucket 1 MiB (checked against the installed torch).
    import torch
    from torch.nn.parallel import distributed as ddp

    first, rest = ParallelPlan.parse(dict(ddp_style="torch")).dp_buckets_bytes(2)
    assert first == torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
    assert rest == int(getattr(ddp, "_DEFAULT_BUCKET_CAP_MB", 25) * getattr(ddp, "_MB_TO_BYTES", 1024 * 1024))
    assert ParallelPlan.parse(dict(ddp_style="torch", dp_bucket_bytes=1000)).dp_buckets_bytes(2) == (
        first,
        1000,
    )


# (good plan, model, world, the smallest change that breaks the rule it sits on, field that rule names)
EDGES = [
    (dict(tp=2, pp=2, dp=2), DENSE, 8, dict(), 16, "world"),  # 2*2*2 ranks, no more
    (dict(tp=2, dp=4, ep=4), MOE, None, dict(ep=8), None, "ep"),  # ep divides dp*cp
    (dict(tp=8), MLA, None, dict(tp=16), None, "tp"),  # MLA: only the 8 heads must divide
    (dict(tp=2), DENSE, None, dict(tp=8), None, "tp"),  # GQA: the 2 KV heads must divide too
    (dict(cp=2, seq=64, cp_mode="allgather", dp=1), DENSE, None, dict(seq=63), None, "seq"),
    (dict(cp=4, phase="decode", seq=1, context=4096), DENSE, None, dict(context=4094), None, "context"),
]


@pytest.mark.parametrize(("good", "model", "world", "change", "bad_world", "field"), EDGES)
def test_good_plans_pass_and_the_next_step_fails(good: dict, model: ModelSpec, world: int | None, change: dict,
                                                 bad_world: int | None, field: str) -> None:
    """Each good plan sits on a rule's edge: it validates, and the smallest step over fails naming the rule."""
    plan = ParallelPlan.parse(good)
    assert plan.validate_for(model, world=world) is None
    assert plan.world == good.get("tp", 1) * good.get("cp", 1) * good.get("dp", 1) * good.get("pp", 1)
    with pytest.raises(SpecError) as info:
        ParallelPlan.parse(good | change).validate_for(model, world=bad_world)
    assert info.value.field == field and "\n" not in str(info.value)


# (plan, model, world, field named in the error, a phrase that names the rule)
BAD = [
    (dict(tp=16), DENSE, None, "tp", "num_heads=8"),
    (dict(tp=4), DENSE, None, "tp", "num_kv_heads=2"),
    (
        dict(tp=3),
        ModelSpec(name="x", num_layers=2, hidden=96, num_heads=3, ffn=100, vocab=10),
        None,
        "tp",
        "ffn=100",
    ),
    (dict(pp=3), DENSE, None, "pp", "pp*vpp"),
    (dict(pp=2, vpp=3, schedule="interleaved", global_batch=2), DENSE, None, "pp", "pp*vpp"),
    (dict(pp=2, pp_layer_split=[3, 4]), DENSE, None, "pp_layer_split", "sums to 7"),
    (dict(pp=2, pp_layer_split=[8]), DENSE, None, "pp_layer_split", "pp*vpp=2 entries"),
    (dict(dp=4, ep=3), MOE, None, "ep", "divide dp*cp"),
    (dict(dp=3, ep=3), MOE, None, "ep", "num_experts=8"),
    (dict(ep=2, dp=2), DENSE, None, "ep", "no experts"),
    (dict(dp=4, micro_batch=2, global_batch=12), DENSE, None, "global_batch", "dp*micro_batch"),
    (dict(tp=2, dp=2), DENSE, 8, "world", "world size is 8"),
    (dict(cp=3, seq=100), DENSE, None, "seq", "divisible by cp=3"),
    (dict(cp=2, seq=6), DENSE, None, "seq", "2*cp=4"),
    (
        dict(tp=4, sp=True, seq=6),
        ModelSpec(name="y", num_layers=2, hidden=64, num_heads=4, ffn=64, vocab=8),
        None,
        "seq",
        "sequence parallelism",
    ),
    (dict(vpp=2, pp=2), DENSE, None, "vpp", "requires schedule interleaved"),
    (dict(schedule="interleaved", pp=2), DENSE, None, "schedule", "vpp > 1"),
    (
        dict(schedule="interleaved", pp=4, vpp=2, global_batch=6),
        DENSE,
        None,
        "global_batch",
        "divisible by pp=4",
    ),
    (dict(rank_order=["tp", "dp", "pp"]), DENSE, None, "rank_order", "each of tp, cp, dp, pp"),
    (dict(rank_order=["ep", "tp", "cp", "dp", "pp"]), DENSE, None, "rank_order", "next to cp or dp"),
    (
        dict(cp=2, dp=2, ep=2, seq=64, rank_order=["cp", "tp", "dp", "pp"]),
        MOE,
        None,
        "rank_order",
        "adjacent",
    ),
    (dict(cp=2, dp=2, seq=64, rank_order="cp,tp,dp,pp"), DENSE, None, "rank_order", "adjacent"),
    (dict(phase="decode", cp=4, seq=1, context=10), DENSE, None, "context", "cp=4"),
    (dict(dp=4, zero=3, zero_shard_size=3), DENSE, None, "zero_shard_size", "must divide"),
    (dict(seq=2048), GPT2, None, "seq", "max_seq=1024"),
]


@pytest.mark.parametrize("plan,model,world,field,phrase", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_plan_one_line_error(
    plan: dict, model: ModelSpec, world: int | None, field: str, phrase: str
) -> None:
    with pytest.raises(SpecError) as info:
        ParallelPlan.parse(plan).validate_for(model, world=world)
    assert info.value.field == field
    assert phrase in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data,field,allowed",
    [
        (dict(schedule="pipedream"), "plan.schedule", "gpipe"),
        (dict(dtype="int4"), "plan.dtype", "fp8"),
        (dict(zero=4), "plan.zero", "3"),
        (dict(tp=0), "plan.tp", None),
        (dict(tpp=2), "plan.tpp", "global_batch"),
    ],
)
def test_bad_values_name_field_and_allowed(data: dict, field: str, allowed: str | None) -> None:
    with pytest.raises(SpecError) as info:
        ParallelPlan.parse(data)
    assert info.value.field == field
    if allowed:
        assert allowed in str(info.value)
    assert "\n" not in str(info.value)


def test_plan_is_frozen_and_forbids_extra() -> None:
    p = ParallelPlan()
    with pytest.raises(ValidationError, match="frozen_instance"):
        p.tp = 2  # type: ignore[misc]
    assert p.tp == 1
    with pytest.raises(ValidationError, match="extra_forbidden"):
        ParallelPlan(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(SpecError) as info:  # the file / CLI path: one line naming the key and the allowed ones
        ParallelPlan.parse({"bogus": 1})
    assert info.value.field == "plan.bogus" and "tp, pp, dp" in str(info.value)


def test_load_plan_yaml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("tp: 2\npp: 2\ndp: 2\nschedule: gpipe\nrank_order: [tp, dp, cp, pp]\nsp: true\n")
    p = load_plan(f)
    assert (p.tp, p.pp, p.dp, p.schedule, p.rank_order, p.sp) == (
        2,
        2,
        2,
        "gpipe",
        ("tp", "dp", "cp", "pp"),
        True,
    )
    q = load_plan(f, {"tp": 4, "sp": False, "pp": None})
    assert (q.tp, q.pp, q.sp) == (4, 2, False)


@pytest.mark.parametrize(
    "text,where,phrase",
    [
        ("tp: 2\npp: [1\n", ":3", "malformed YAML"),
        ("tp: 2\n  dp: 3\n", ":2", "malformed YAML"),
        ("tp: 2\nbogus: 1\n", ":2", "unknown plan key 'bogus'"),
        ("- 1\n- 2\n", ":1", "mapping"),
    ],
)
def test_load_plan_errors_are_one_line_with_file_line(
    tmp_path: Path, text: str, where: str, phrase: str
) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as info:
        load_plan(f)
    assert info.value.field == f"{f}{where}"
    assert phrase in str(info.value) and "\n" not in str(info.value)
    if "unknown" in phrase:
        assert "global_batch" in str(info.value)  # lists the allowed keys


def test_yaml_value_error_names_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("schedule: nope\n")
    with pytest.raises(SpecError) as info:
        load_plan(f)
    assert info.value.field == f"{f}.schedule"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        load_plan(tmp_path / "none.yaml")
    assert exc.value.field == str(tmp_path / "none.yaml") and "cannot read plan file" in str(exc.value)


def test_megatron_style_order_string_and_dp_axes() -> None:
    p = ParallelPlan.parse(dict(dp=4, cp=2, ep=4, seq=64, zero=1, rank_order="tp-cp-ep-dp-pp"))
    assert p.rank_order == ("tp", "cp", "ep", "dp", "pp")
    assert p.dp_axes() == (("cp", "dp"), ())
    assert p.dp_axes(expert=True) == (("edp",), ())
    assert ParallelPlan.parse(dict(dp=4)).dp_axes() == (("dp",), ())
    assert ParallelPlan.parse(dict(tp=2)).dp_axes() == (("dp",), ())
    assert ParallelPlan.parse(dict(dp=8, zero=3, zero_shard_size=2)).dp_axes() == (
        ("dp_shard",),
        ("dp_replicate",),
    )
    ps = p.param_sharding(("h", "f"))
    assert ps.zero == 1 and set(ps.grad) == {"cp", "dp"}
