"""Graph conventions as plan flags and plan YAML keys: ``--attention-impl``, ``--attention-flops``,
``--dropout``, ``--megatron-fusions`` reach the graph a command builds.

The effect on the graph is checked against closed forms written out here (b micro-batch, s
sequence, h hidden, a heads, L layers):

* ``attention_flops full`` minus ``causal_half``: half of QK^T and PV (2*b*s^2*h each non-causal)
  in forward (2bs^2h), twice that in backward; with flash, backward also recomputes QK^T inside
  the kernel (FlashAttention-2: 5 backward matmuls vs 2 forward). So ``6*b*s^2*h`` per layer
  materialized, ``7*b*s^2*h`` with flash.
* ``materialized`` minus ``flash`` saved bytes: the 16-bit softmax probabilities ``2*a*s^2*b``
  replace flash's fp32 log-sum-exp ``4*a*s*b`` (Korthikanti et al. 2022, Sec. 4.1).
* ``dropout`` on a materialized block: the attention dropout mask and output ``3*a*s^2*b`` plus
  two 1-byte residual-dropout masks ``2*s*b*h`` per layer (Korthikanti's ``5as/h`` term is the
  probabilities plus these), and one embedding-dropout mask ``s*b*h``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.commands.planopts import PLAN_FLAGS, plan_from_options
from tensorstage.errors import SpecError
from tensorstage.graph.options import GraphOptions
from tensorstage.lower import graph_options, lower
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tests.support import run_main

runner = CliRunner()
B, S = 2, 1024
CONVENTIONS = ("attention_impl", "attention_flops", "dropout", "megatron_fusions")


def _costs(**plan: object) -> tuple[float, float]:
    """(total matmul FLOPs, saved activation bytes) of one micro-batch of gpt3-125m under ``plan``."""
    lowered = lower(resolve_model("gpt3-125m"), ParallelPlan.parse({"seq": S, "micro_batch": B, **plan}))
    rep = lowered.graph.costs({"b": B, "s": S, "c": S}, exact=True)
    return float(rep.total_flops()), float(rep.totals["activation_bytes"])


def test_every_convention_is_a_plan_flag_and_key() -> None:
    names = {name for name, *_ in PLAN_FLAGS}
    assert set(CONVENTIONS) <= names
    assert set(CONVENTIONS) <= set(ParallelPlan.model_fields)


def test_flags_and_yaml_reach_graph_options(tmp_path: Path) -> None:
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("attention_impl: materialized\ndropout: true\nattention-flops: full\n")
    plan = plan_from_options(cfg, megatron_fusions=True, attention_impl="flash")  # flag beats YAML
    opts = graph_options(plan)
    assert (opts.attention_impl, opts.attention_flops, opts.dropout, opts.megatron_fusions) == (
        "flash", "full", True, True)


def test_unset_keeps_the_callers_options() -> None:
    """A plan that names no convention leaves the caller's (e.g. validate's) options alone."""
    base = GraphOptions(attention_impl="materialized", attention_flops="full", dropout=True, megatron_fusions=True)
    assert graph_options(ParallelPlan.parse({}), base) == base
    assert graph_options(ParallelPlan.parse({"dropout": False}), base).dropout is False


def test_attention_flops_convention_closed_form() -> None:
    h, layers = 768, 12
    for impl, per_layer in (("materialized", 6), ("flash", 7)):
        half, _ = _costs(attention_impl=impl, attention_flops="causal_half")
        full, _ = _costs(attention_impl=impl, attention_flops="full")
        assert full - half == per_layer * B * S**2 * h * layers


def test_attention_impl_and_dropout_saved_bytes_closed_form() -> None:
    h, a, layers = 768, 12, 12
    _, flash = _costs(attention_impl="flash")
    _, eager = _costs(attention_impl="materialized")
    assert eager - flash == layers * (2 * a * S**2 * B - 4 * a * S * B)
    _, eager_drop = _costs(attention_impl="materialized", dropout=True)
    assert eager_drop - eager == layers * (3 * a * S**2 * B + 2 * S * B * h) + S * B * h


def test_megatron_fusions_merge_kernels() -> None:
    plain = lower(resolve_model("gpt3-125m"), ParallelPlan.parse({"seq": S}))
    fused = lower(resolve_model("gpt3-125m"), ParallelPlan.parse({"seq": S, "megatron_fusions": True}))
    nodes = [sum(len(p.nodes) for p in lo.programs) for lo in (plain, fused)]
    assert fused.graph.options.megatron_fusions and nodes[1] < nodes[0]


@pytest.mark.parametrize(
    ("key", "value"), [("attention_impl", "flashy"), ("attention_flops", "half"), ("dropout", "maybe")]
)
def test_bad_values_name_the_field(key: str, value: str) -> None:
    with pytest.raises(SpecError, match=f"^plan.{key}: "):
        ParallelPlan.parse({key: value})


def test_dropout_outside_training_is_refused() -> None:
    with pytest.raises(SpecError, match="^dropout: applies only to phase train"):
        ParallelPlan.parse({"dropout": True, "phase": "prefill"})
    assert ParallelPlan.parse({"dropout": False, "phase": "decode"}).dropout is False


def test_cli_bad_value_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    res = run_main(monkeypatch, capsys, "simulate", "gpt3-125m", "--system", "dgx-a100-selene",
                   "--attention-flops", "x")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "attention_flops" in lines[0] and "causal_half, full" in lines[0]


def test_generate_records_the_conventions(tmp_path: Path) -> None:
    out = tmp_path / "traces"
    res = runner.invoke(app, ["generate", "gpt3-125m", "--seq", "512", "--out", str(out),
                              "--attention-impl", "materialized", "--no-dropout", "--megatron-fusions"])
    assert res.exit_code == 0, res.output
    text = "".join(p.read_text() for p in sorted(out.glob("*.json")))
    assert '"attention_impl": "materialized"' in text and '"megatron_fusions": true' in text


def test_explain_takes_attention_impl_and_fusions() -> None:
    res = runner.invoke(app, ["explain", "gpt3-125m", "--seq", "256", "--json",
                              "--attention-impl", "materialized", "--megatron-fusions"])
    assert res.exit_code == 0, res.output
    opts = json.loads(res.output)["options"]
    assert opts["attention_impl"] == "materialized" and opts["megatron_fusions"] is True
