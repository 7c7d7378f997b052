"""best-serving: the deployments it enumerates, its ranking, and the serve --config round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.errors import SpecError
from tensorstage.explore.bestserving import INFEASIBLE, OK, best_serving, serve_config, serving_layouts
from tensorstage.hardware.system import load_system
from tensorstage.model import resolve_model
from tensorstage.serve import ServingPlan, Workload, load_profile, simulate

TINY = Workload(64, 128, 16)  # gpt3-125m: 12 heads, a few ms per simulation


def test_layouts_are_the_tp_sizes_dividing_gpus_and_heads_within_a_node():
    # 12 heads, 8-GPU nodes, 8 GPUs: TP 1, 2, 4 (3 and 6 do not divide 8; 8 does not divide 12)
    assert serving_layouts(12, 8, 8) == [(1, 8, None), (2, 4, None), (4, 2, None)]
    # with disaggregation, every P:D split of the n replicas: 7 + 3 + 1 splits besides the 3 above
    lay = serving_layouts(12, 8, 8, disagg=True)
    assert len(lay) == 3 + 7 + 3 + 1 and (4, 2, (1, 1)) in lay and (1, 8, (3, 5)) in lay
    # 64 heads on 16 GPUs: TP stops at the node size
    assert [t for t, _, _ in serving_layouts(64, 8, 16)] == [1, 2, 4, 8]
    with pytest.raises(SpecError):
        serving_layouts(12, 8, 0)


def test_offline_ranking_is_the_simulators_throughput_best_first():
    bs = best_serving("gpt3-125m", "dgx-a100-selene", 4, engine="vllm", workload=TINY)
    assert [d.label for d in bs.deployments] and all(d.status == OK for d in bs.deployments)
    tput = [d.metrics["output_tokens_per_s"] for d in bs.deployments]
    assert tput == sorted(tput, reverse=True)
    # each number is what `serve` simulates for that deployment on the same workload
    for d in bs.deployments:
        plan = ServingPlan(engine=load_profile("vllm"), tp=d.tp, replicas=d.replicas)
        direct = simulate(resolve_model("gpt3-125m"), "dgx-a100-selene", plan, TINY).metrics.output_tokens_per_s
        assert d.metrics["output_tokens_per_s"] == direct
    assert serve_config(bs)["tp"] == bs.deployments[0].tp


def test_weights_that_do_not_fit_are_infeasible_with_the_reason():
    # Llama-2-70B in bf16: ~69e9 params x 2 bytes = 128 GiB per device at TP1, more than 0.9 x 80 GiB;
    # TP2 gives 64 GiB, which fits. One request keeps the run short.
    bs = best_serving("llama2-70b", "dgx-h100-superpod", 2, workload=Workload(2, 64, 4))
    by_tp = {d.tp: d for d in bs.deployments}
    assert by_tp[1].status == INFEASIBLE and "do not fit" in by_tp[1].message
    assert by_tp[2].status == OK and bs.best is by_tp[2]


def test_cli_writes_a_config_that_serve_runs_to_the_same_number(tmp_path):
    out = tmp_path / "best.yaml"
    run = CliRunner().invoke(app, ["best-serving", "gpt3-125m", "--system", "dgx-a100-selene", "--gpus", "4",
                                   "--engine", "vllm", "--requests", "64", "--isl", "128", "--osl", "16",
                                   "--out", str(out), "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    cfg = yaml.safe_load(out.read_text())
    assert cfg == doc["serve_config"] and cfg["tp"] == doc["ranking"][0]["tp"]
    served = CliRunner().invoke(app, ["serve", "gpt3-125m", "-c", str(out), "--offline", "64", "--isl", "128",
                                      "--osl", "16", "--json"])
    assert served.exit_code == 0, served.output
    assert json.loads(served.output)["output_tokens_per_s"] == pytest.approx(
        doc["ranking"][0]["output_tokens_per_s"], rel=1e-6)


def test_bad_config_and_flags_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("qps: 3\n")
    code = "from tensorstage.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code, "serve", "gpt3-125m", "-c", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: --config: unknown option 'qps'")
    bad.write_text("tp: two\n")
    run = CliRunner().invoke(app, ["serve", "gpt3-125m", "-c", str(bad)])
    assert isinstance(run.exception, SpecError) and run.exception.field == "--config tp"
    run = CliRunner().invoke(app, ["best-serving", "gpt3-125m", "--system", "dgx-a100-selene", "--gpus", "4",
                                   "--dtype", "fp7"])
    assert isinstance(run.exception, SpecError) and run.exception.field == "--dtype"


def test_saturated_rate_excludes_the_drain_and_needs_a_turned_over_batch():
    """The saturated offline rate is the long-run rate: nearly the same for 600 and 1,200 requests
    (the whole-run rate moves with the drain's share), and absent when the batch never turned over
    while requests queued (64 requests that all fit in one batch)."""
    spec = resolve_model("gpt3-125m")
    sysm = load_system("dgx-a100-selene")
    plan = ServingPlan(engine=load_profile("vllm", max_num_seqs=32), tp=1)
    runs = [simulate(spec, sysm, plan, Workload(n, 128, 64, lengths="uniform", spread=0.5, seed=1)).metrics
            for n in (600, 1200)]
    sat = [m.extra["saturated_output_tokens_per_s"] for m in runs]
    whole = [m.output_tokens_per_s for m in runs]
    assert abs(sat[0] / sat[1] - 1) < 0.02
    assert abs(whole[0] / whole[1] - 1) > abs(sat[0] / sat[1] - 1)
    assert all(w < s for w, s in zip(whole, sat, strict=True))  # the drain only lowers the whole-run rate
    few = simulate(spec, sysm, plan.__class__(engine=load_profile("vllm"), tp=1), Workload(64, 128, 64)).metrics
    assert "saturated_output_tokens_per_s" not in few.extra


def test_short_runs_rank_by_whole_run_throughput_with_a_note():
    bs = best_serving("gpt3-125m", "dgx-a100-selene", 4, engine="vllm", workload=TINY)
    assert bs.objective == "output_tokens_per_s" and "raise --requests" in bs.note


@pytest.mark.parametrize("system, published", [("dgx-h100-superpod", "TP2x4"), ("dgx-h200", "TP1x8")])
def test_mlperf_llama2_70b_picks_the_published_layouts(system, published):
    """MLPerf Inference v4.1 Llama-2-70B FP8 on 8 GPUs: NVIDIA submitted TP2x4 on H100 and TP1x8 on
    H200. One pass over the dataset's own (input, output) token counts, ranked by the saturated
    offline rate, picks the same layouts."""
    from tensorstage.validation.serving import DATASET_LENGTHS

    lengths = str(DATASET_LENGTHS["MLPerf llama2-70b dataset"])
    bs = best_serving("llama2-70b", system, 8, engine="trtllm", weight_dtype="fp8", kv_dtype="fp8",
                      workload=Workload(24576, 1, 1, lengths_file=lengths))
    assert bs.objective == "saturated_output_tokens_per_s" and not bs.note
    assert bs.best is not None and bs.best.label == published


def test_default_runs_are_lengthened_to_a_steady_state():
    """Without a request count of the user's, best-serving lengthens the offline runs (x4 per try)
    until every deployment's queue outlives half its requests, then ranks by the saturated rate."""
    bs = best_serving("gpt3-125m", "dgx-a100-selene", 4, engine="vllm", workload=TINY, auto_requests=True)
    assert bs.settings["requests_auto"] and bs.settings["requests"] in (64 * 4, 64 * 16, 64 * 64, 64 * 256)
    assert bs.objective == "saturated_output_tokens_per_s" and not bs.note
    assert all("saturated_output_tokens_per_s" in d.metrics for d in bs.deployments if d.status == OK)
