"""`tensorstage validate`: case mapping, source FLOP conventions, accuracy bounds of issue 6.

Independent references: the public cases file's own published/derived numbers (Narayanan eq. 3
conversions, Korthikanti MFU), Korthikanti's closed form for in-flight activations under the
interleaved schedule, and the MAMF GEMM measurements (stas00/ml-engineering) for the compute model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tensorstage.hardware.presets import load_device
from tensorstage.schedule.pipeline import pipeline_order
from tensorstage.sim.compute import ComputeModel
from tensorstage.validation.cases import GROUP_T5, default_cases_path, load_targets
from tensorstage.validation.run import (
    in_flight,
    narayanan_flops_full_recompute,
    narayanan_flops_no_recompute,
    report,
    run_targets,
)

CASES = default_cases_path()


def _cases() -> dict[str, dict]:
    return {c["id"]: c for c in yaml.safe_load(CASES.read_text())["cases"]}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensorstage.cli", *args], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "COLUMNS": "200"})


# --- conventions -----------------------------------------------------------------------------------


def test_narayanan_formula_reproduces_published_iteration_times() -> None:
    """eq. 3 with each Table 1 row's measured TFLOP/s gives the file's derived iteration time."""
    rows = [c for c in _cases().values() if c["id"].startswith("TRAIN-NARAYANAN21-T1-")]
    assert len(rows) == 10
    for c in rows:
        m, p = c["model"], c["parallel"]
        flops = narayanan_flops_full_recompute(p["global_batch"], m["seq_len"], m["layers"], m["hidden"],
                                               m["vocab"])
        t = flops / (c["hardware"]["num_gpus"] * c["measured"]["tflops_per_gpu"] * 1e12)
        assert t == pytest.approx(c["derived"]["iteration_time_s_from_eq3"], rel=0.01), c["id"]


def test_readme_gpt3_175b_time_and_tflops_agree_under_full_recompute_convention() -> None:
    """Megatron README: ~32 s per step <-> 138 TFLOP/s per GPU on 1024 A100 (so recompute is counted)."""
    flops = narayanan_flops_full_recompute(1536, 2048, 96, 12288, 51200)
    assert flops / (32 * 1024) / 1e12 == pytest.approx(138, rel=0.01)


def test_korthikanti_mfu_convention() -> None:
    """Table 5: 22B selective+SP, 1.10 s on 8 A100 is reported as 41.5 % MFU (no-recompute FLOPs)."""
    mfu = narayanan_flops_no_recompute(4, 2048, 48, 6144, 51200) / (1.10 * 8 * 312e12)
    assert 100 * mfu == pytest.approx(41.5, abs=0.5)


@pytest.mark.parametrize(("pp", "vpp"), [(8, 3), (35, 3), (4, 2)])
def test_in_flight_microbatches_match_korthikanti_interleave_factor(pp: int, vpp: int) -> None:
    """First stage holds L(1 + (p-1)/(p v)) layers of activations = (p v + p - 1) chunks in flight."""
    actions = pipeline_order("interleaved", pp, 4 * pp, vpp)[0]
    layers_worth = in_flight(actions) / (pp * vpp)  # in units of "all L layers once"
    assert layers_worth == pytest.approx(1 + (pp - 1) / (pp * vpp))
    assert in_flight(pipeline_order("1f1b", pp, 4 * pp)[0]) == pp


# --- compute model vs published GEMM measurements ----------------------------------------------------


@pytest.mark.parametrize(
    ("device", "shape", "mamf_tflops"),
    [
        # stas00/ml-engineering compute/accelerator README, "Maximum Achievable Matmul FLOPS" table (bf16)
        ("A100-80GB", (6912, 16384, 2048), 267.9),
        ("H100-SXM", (6144, 17920, 2816), 792.1),
    ],
)
def test_large_gemm_rate_is_below_and_near_the_measured_maximum(device: str, shape: tuple, mamf_tflops: float
                                                                ) -> None:
    """A large GEMM is charged no faster than the best measured shape (MAMF), and within 10 % of it."""
    m, n, k = shape
    cm = ComputeModel.from_device(load_device(device), "bf16")
    flops = 2 * m * n * k
    rate = flops / cm.time_s(flops, 2 * (m * k + k * n + m * n), "einsum") / 1e12
    assert 0.90 * mamf_tflops <= rate <= mamf_tflops


# --- mapping and CLI ------------------------------------------------------------------------------------


def test_table5_cases_map_to_their_published_configs() -> None:
    targets, skipped = load_targets(CASES)
    t5 = [t for t in targets if GROUP_T5 in t.groups]
    assert len(t5) == 8
    cases = _cases()
    for t in t5:
        par = cases[t.case_id]["parallel"]
        plan = t.setup.plan
        assert (plan.tp, plan.pp, plan.dp, plan.global_batch, plan.micro_batch, plan.vpp) == (
            par["tp"], par["pp"], par["dp"], par["global_batch"], par["micro_batch"],
            par["interleaved_chunks_per_stage"])
        assert plan.recompute == ("full" if t.id.endswith("FULL") else "selective")
        assert plan.sp == par["sequence_parallel"]
        assert t.setup.options.attention_impl == "materialized"
    assert not [s for s in skipped if s[0].startswith("TRAIN-")]


def test_bad_cases_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "cases.yaml"
    bad.write_text("title: no cases here\n")
    out = _cli("validate", "--cases", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: --cases: {bad} has no 'cases' list"]
    out = _cli("validate", "--cases", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "--cases" in out.stderr


def test_validate_json_schema_and_errors() -> None:
    out = _cli("validate", "--json", "--only", "T5-22B-FULL|FIG1-22B:params")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {"cases", "mape_pct", "groups"} <= set(doc)
    ids = [c["id"] for c in doc["cases"]]
    assert ids == ["TRAIN-KORTHIKANTI22-T5-22B-FULL", "MEM-KORTHIKANTI22-FIG1-22B:params_grads_optimizer_GiB"]
    for c in doc["cases"]:
        assert {"id", "metric", "predicted", "measured", "error_pct"} <= set(c)
        assert c["error_pct"] == pytest.approx(100 * (c["predicted"] - c["measured"]) / c["measured"])
    assert doc["cases"][0]["measured"] == 1.42  # Korthikanti Table 5, 22B full recompute
    assert doc["mape_pct"] == pytest.approx(abs(doc["cases"][0]["error_pct"]))


# --- accuracy (issue 6) ------------------------------------------------------------------------------
#
# Bounds of issue 6: Korthikanti Table 5 MAPE <= 4 %, all training cases <= 10 %, memory within 2 %.
# Achieved (docs/calibration.md, 2026-11-28): Table 5 3.6 % (max 7.6 %), training 5.8 %, memory max
# 1.7 %, per-layer (Table 4) 2.4 %. Every bound is the issue's own.

T5_MAPE_BOUND = 4.0
TRAINING_MAPE_BOUND = 10.0
MEMORY_MAX_ERROR = 2.0
LAYER_MAPE_BOUND = 4.0


@pytest.fixture(scope="module")
def validation() -> dict:
    targets, _ = load_targets(CASES)
    return report(run_targets(targets), [])


def test_every_target_is_predicted(validation: dict) -> None:
    failed = [c["id"] for c in validation["cases"] if c["predicted"] is None]
    assert not failed, failed


def test_korthikanti_table5_step_time_mape(validation: dict) -> None:
    g = validation["groups"]["korthikanti_t5"]
    assert g["n"] == 8
    assert g["mape_pct"] <= T5_MAPE_BOUND


def test_all_training_cases_mape_within_10_pct(validation: dict) -> None:
    g = validation["groups"]["training"]
    assert g["n"] == 21
    assert validation["mape_pct"] == g["mape_pct"] <= TRAINING_MAPE_BOUND


def test_memory_cases_within_2_pct(validation: dict) -> None:
    g = validation["groups"]["memory"]
    assert g["n"] >= 28
    assert g["max_abs_error_pct"] <= MEMORY_MAX_ERROR


def test_per_layer_times_of_table4(validation: dict) -> None:
    assert validation["groups"]["layer"]["mape_pct"] <= LAYER_MAPE_BOUND
