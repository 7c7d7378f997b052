"""Shared plan flags: a dummy typer app gets exactly the plan flags, YAML values, flag overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tensorstage.commands.planopts import PLAN_FLAGS, plan_from_options, with_plan_options
from tensorstage.errors import SpecError
from tensorstage.parallel.plan import ParallelPlan

app = typer.Typer()


@app.command()
@with_plan_options
def generate(model: str, plan: ParallelPlan, out: str = typer.Option("out", "--out")) -> None:
    """Dummy command: prints what it got."""
    typer.echo(json.dumps({"model": model, "out": out, "plan": plan.model_dump(mode="json")}))


@app.command()
@with_plan_options
def simulate(plan: ParallelPlan) -> None:
    typer.echo(json.dumps(plan.model_dump(mode="json")))


runner = CliRunner()


def run(*args: str) -> dict:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_flags_build_plan() -> None:
    got = run(
        "generate",
        "llama",
        "--out",
        "d",
        "--tp",
        "2",
        "--pp",
        "2",
        "--dp",
        "4",
        "--cp",
        "2",
        "--ep",
        "4",
        "--vpp",
        "2",
        "--sp",
        "--zero",
        "1",
        "--schedule",
        "interleaved",
        "--recompute",
        "selective",
        "--seq",
        "4096",
        "--global-batch",
        "64",
        "--micro-batch",
        "2",
        "--dtype",
        "fp8",
        "--rank-order",
        "tp,cp,dp,pp",
    )
    assert (got["model"], got["out"]) == ("llama", "d")
    p = got["plan"]
    assert (p["tp"], p["pp"], p["dp"], p["cp"], p["ep"], p["vpp"], p["sp"], p["zero"]) == (
        2,
        2,
        4,
        2,
        4,
        2,
        True,
        1,
    )
    assert (p["schedule"], p["recompute"], p["seq"], p["global_batch"], p["micro_batch"], p["dtype"]) == (
        "interleaved",
        "selective",
        4096,
        64,
        2,
        "fp8",
    )
    assert p["rank_order"] == ["tp", "cp", "dp", "pp"]


def test_both_commands_take_the_same_flags() -> None:
    def flags(cmd: str) -> set[str]:
        text = runner.invoke(app, [cmd, "--help"], terminal_width=200, env={"COLUMNS": "250"}).output
        return {tok.strip("│ ,") for tok in text.split() if tok.startswith("--")}

    plan_flags = {d.split("/")[0] for _, _, decls, _ in PLAN_FLAGS for d in decls} | {"--config", "--no-sp"}
    assert plan_flags <= flags("generate")
    assert plan_flags <= flags("simulate")
    assert flags("generate") - {"--out"} == flags("simulate")


def test_yaml_then_flags_override(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("tp: 4\npp: 2\ndp: 2\nsp: true\nschedule: gpipe\nseq: 1024\n")
    p = run("simulate", "-c", str(f))
    assert (p["tp"], p["pp"], p["dp"], p["sp"], p["schedule"], p["seq"]) == (4, 2, 2, True, "gpipe", 1024)
    p = run("simulate", "--config", str(f), "--tp", "2", "--no-sp", "--seq", "512")
    assert (p["tp"], p["pp"], p["sp"], p["schedule"], p["seq"]) == (2, 2, False, "gpipe", 512)


def test_bad_flag_value_is_spec_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--schedule", "pipedream"])
    assert isinstance(result.exception, SpecError) and result.exception.field == "plan.schedule"
    result = runner.invoke(app, ["simulate", "--pp", "2", "--vpp", "2"])
    assert isinstance(result.exception, SpecError) and result.exception.field == "vpp"
    f = tmp_path / "p.yaml"
    f.write_text("tp: 2\nfoo: 1\n")
    result = runner.invoke(app, ["simulate", "-c", str(f)])
    assert isinstance(result.exception, SpecError) and result.exception.field == f"{f}:2"


def test_plan_from_options_helper() -> None:
    p = plan_from_options(None, tp=2, pp=None, rank_order="tp, dp, cp, pp")
    assert p.tp == 2 and p.pp == 1 and p.rank_order == ("tp", "dp", "cp", "pp")


def test_decorator_requires_plan_parameter() -> None:
    with pytest.raises(TypeError, match="bad needs a 'plan' parameter"):

        @with_plan_options
        def bad(model: str) -> None: ...


def test_uneven_pipeline_split_and_extra_flags() -> None:
    got = run("generate", "m", "--pp", "2", "--pp-layer-split", "3,5", "--dp", "4", "--zero", "3",
              "--zero-shard-size", "2", "--ddp-style", "torch", "--routing-skew", "1.5")
    assert got["plan"]["pp_layer_split"] == [3, 5]
    assert got["plan"]["zero_shard_size"] == 2
    assert got["plan"]["ddp_style"] == "torch"
    assert got["plan"]["routing_skew"] == 1.5


def test_bad_layer_split_names_the_field() -> None:
    with pytest.raises(SpecError) as err:
        plan_from_options(pp=2, pp_layer_split="3,x")
    assert err.value.field == "pp_layer_split"
