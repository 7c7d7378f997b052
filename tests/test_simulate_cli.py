"""``tensorstage simulate MODEL`` and ``tensorstage run`` on the real lowering.

* consistency (issue 6): a TP 2 x PP 2 x DP 2 plan simulated from the model and from the Chakra
  traces ``run`` wrote gives the same step time and peak memory;
* memory: ZeRO-0 Megatron model state is 18 bytes per parameter, parameters counted here in closed form;
* fused lowering (``lower(fuse=True)``) simulates to the same step time as the unfused one;
* outputs are byte-identical across runs; bad input exits 2 with one line.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.hardware import load_system
from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.sim import simulate

runner = CliRunner()
#: One GPU, no recompute, seq 2048 (the model's maximum): the smallest plan (flags override the default plan).
SMALL = ["gpt3-125m", "--system", "dgx-a100-selene", "--tp", "1", "--pp", "1", "--seq", "2048", "--zero", "0",
         "--recompute", "none"]


def _json(args: list[str]) -> dict:
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``tensorstage run`` (default model/plan: TP 2, PP 2, DP 2) twice into two directories."""
    dirs = []
    for i in range(2):
        d = tmp_path_factory.mktemp(f"run{i}") / "out"
        res = runner.invoke(app, ["run", "--out", str(d)])
        assert res.exit_code == 0, res.output
        assert f"report: {d / 'report.md'}" in res.output.replace("\n", "")
        dirs.append(d)
    return dirs


def test_model_and_trace_give_the_same_step(run_dirs: list[Path]) -> None:
    d = run_dirs[0]
    result = json.loads((d / "result.json").read_text())
    plan = result["inputs"]["plan"]
    assert (plan["tp"], plan["pp"], plan["dp"]) == (2, 2, 2)
    from_trace = _json(["simulate", "--trace", str(d / "traces"), "--json"])
    assert from_trace["step_time_s"] == pytest.approx(result["step_time_s"], rel=1e-12)
    assert from_trace["peak_memory_bytes"] == result["peak_memory_bytes"]
    assert from_trace["mfu"] == pytest.approx(result["mfu"], rel=1e-12)
    assert from_trace["tokens_per_s"] == pytest.approx(result["tokens_per_s"], rel=1e-12)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in plan.items()
             if k in ("tp", "pp", "dp", "zero", "schedule", "recompute", "seq", "global_batch", "micro_batch")]
    direct = _json(["simulate", result["inputs"]["model"], "--system", result["inputs"]["system"],
                    "--sp" if plan["sp"] else "--no-sp", *flags, "--json"])
    assert direct["step_time_s"] == result["step_time_s"]
    # tokens/s from the plan: global batch x sequence per step
    assert direct["tokens_per_s"] == pytest.approx(plan["global_batch"] * plan["seq"] / direct["step_time_s"])


def test_json_has_the_documented_keys() -> None:
    data = _json(["simulate", *SMALL, "--dp", "2", "--json"])
    for key in ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "oom", "breakdown"):
        assert key in data
    cls = data["breakdown"]["classes"][0]
    for key in ("compute_s", "exposed_comm_s", "bubble_s", "optimizer_s", "memory"):
        assert key in cls
    assert set(cls["compute_s"]) == {"total", "by_category", "by_op"}
    # per class: compute + exposed communication + bubble = step time (definition in sim.result)
    total = cls["compute_s"]["total"] + cls["exposed_comm_s"]["total"] + cls["bubble_s"]
    assert total == pytest.approx(data["step_time_s"], rel=1e-9)
    assert sum(cls["compute_s"]["by_category"].values()) == pytest.approx(cls["compute_s"]["total"], rel=1e-9)
    assert sum(cls["compute_s"]["by_op"].values()) == pytest.approx(cls["compute_s"]["total"], rel=1e-9)
    assert 0 < data["mfu"] <= data["hfu"] < 1


def test_zero0_model_state_is_18_bytes_per_parameter() -> None:
    data = _json(["simulate", *SMALL, "--dp", "2", "--zero", "0", "--json"])
    mem = data["breakdown"]["classes"][0]["memory"]["by_category_bytes"]
    # GPT-3 125M, one rank holds everything: vocab padded to a multiple of 128 (Megatron), learned
    # positions (2048), per layer 12h^2 + 13h (QKV, proj, 4h MLP, two LayerNorms), final LayerNorm.
    h, layers = 768, 12
    params = 50304 * h + 2048 * h + layers * (12 * h * h + 13 * h) + 2 * h
    # F-MEGATRON-BYTES: bf16 param 2 + fp32 grad 4 + fp32 master/m/v 12
    assert mem["weights"] == 2 * params
    assert mem["gradients"] == 4 * params
    assert mem["weights"] + mem["gradients"] + mem["optimizer_states"] + mem["master_weights"] == 18 * params
    assert data["peak_memory_bytes"] >= 18 * params + mem["activations"]


@pytest.mark.parametrize("plan", [
    {"tp": 2, "pp": 2, "dp": 2, "sp": True, "zero": 1, "recompute": "selective", "global_batch": 8},
    {"pp": 2, "dp": 2, "schedule": "zb-h1", "global_batch": 8},
    {"tp": 2, "pp": 2, "dp": 2, "vpp": 2, "schedule": "interleaved", "recompute": "full", "global_batch": 8},
])
def test_fused_lowering_simulates_the_same(plan: dict) -> None:
    spec = resolve_model("gpt3-125m")
    p = ParallelPlan.parse(plan)
    system = load_system("dgx-a100-selene", p.world)
    plain, fused = lower(spec, p), lower(spec, p, fuse=True)
    assert sum(len(x.nodes) for x in fused.programs) < 0.7 * sum(len(x.nodes) for x in plain.programs)
    a = simulate(plain.programs, plain.mesh, system)
    b = simulate(fused.programs, fused.mesh, system)
    assert b.step_time_s == pytest.approx(a.step_time_s, rel=1e-12)
    assert b.peak_memory_bytes == a.peak_memory_bytes
    for ca, cb in zip(a.classes, b.classes, strict=True):
        assert cb.compute_busy_s == pytest.approx(ca.compute_busy_s, rel=1e-12)
        # a fused node's overlap slowdown is spread over its parts in proportion to their own times,
        # the unfused parts are slowed one by one: the split by category/op may move a little
        tol = 1e-4 * ca.compute_busy_s
        assert cb.compute_by_category_s == pytest.approx(ca.compute_by_category_s, abs=tol)
        assert cb.compute_by_op_s == pytest.approx(ca.compute_by_op_s, abs=tol)
        assert cb.executed_flops == ca.executed_flops


def _digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_run_outputs_are_deterministic(run_dirs: list[Path]) -> None:
    a, b = (_digests(d) for d in run_dirs)
    for name in ("report.md", "report.html", "timeline.png", "time_breakdown.png", "memory_breakdown.png",
                 "result.json", "timeline.json", "traces/manifest.json", "traces/trace.0.et"):
        assert name in a
    assert a == b


@pytest.mark.parametrize("args", [
    ["simulate", "gpt3-125m", "--system", "no-such-system"],
    ["simulate", "no-such-model", "--system", "dgx-h100-superpod"],
    ["simulate", "gpt3-125m"],
    ["simulate", "gpt3-125m", "--system", "dgx-h100-superpod", "--tp", "5"],
    ["run", "--system", "nope", "--out", "/nonexistent/never"],
])
def test_bad_input_exits_2_with_one_line(args: list[str]) -> None:
    code = "from tensorstage.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert "Traceback" not in res.stderr


def test_steady_state_extrapolation_matches_full_simulation() -> None:
    from dataclasses import replace

    from tensorstage.api import simulate as simulate_model
    from tensorstage.sim.steady import extrapolate, steady_counts

    plan = ParallelPlan.parse({"tp": 2, "pp": 2, "dp": 2, "global_batch": 80, "seq": 512, "recompute": "selective"})
    # 40 micro-batches (80 / dp 2); 1F1B with pp 2 fills in pp - 1 = 1 micro-batch, and the counts start
    # past the pp * vpp = 2 virtual stages plus a margin of 2 for the end stages to settle: 4, then
    # evenly spaced by 1 (no interleaving); 40 >= 3 x (6 + 2 window shifts) qualifies the plan
    assert plan.microbatches == 80 // 2 == 40
    assert steady_counts(plan) == (2 + 2, 2 + 2 + 1, 2 + 2 + 2)
    quick = simulate_model("gpt3-125m", "dgx-a100-selene", plan, full=False)
    full = simulate_model("gpt3-125m", "dgx-a100-selene", plan, full=True)
    assert quick.notes and "extrapolated" in quick.notes[0] and not full.notes
    a, b = full.result, quick.result
    assert b.step_time_s == pytest.approx(a.step_time_s, rel=1e-9)
    assert (b.mfu, b.hfu, b.tokens_per_s) == pytest.approx((a.mfu, a.hfu, a.tokens_per_s), rel=1e-9)
    assert b.peak_memory_bytes == a.peak_memory_bytes
    for ca, cb in zip(a.classes, b.classes, strict=True):
        assert cb.compute_by_category_s == pytest.approx(ca.compute_by_category_s, rel=1e-9)
        assert cb.bubble_s == pytest.approx(ca.bubble_s, abs=1e-9 * a.step_time_s)
        assert cb.exposed_comm_total_s == pytest.approx(ca.exposed_comm_total_s, abs=1e-9 * a.step_time_s)
        for k, v in ca.exposed_comm_s.items():  # split of the extrapolated total: same definition
            assert cb.exposed_comm_s[k] == pytest.approx(v, rel=1e-6, abs=1e-9 * a.step_time_s)
        assert (cb.nodes, cb.executed_flops, cb.model_flops) == (ca.nodes, ca.executed_flops, ca.model_flops)
    # a result that is not affine in the micro-batch count is refused (the caller then simulates in full)
    r = b
    bent = replace(r, step_time_s=r.step_time_s * 1.001)
    assert extrapolate(r, r, bent, 1, 10.0, 1) is None


def test_forked_short_runs_give_the_serial_result_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """The steady-state extrapolation's short runs in forked children (the API default on a multi-core
    machine) and one after the other in this process give the same result, field for field."""
    import pickle

    import tensorstage.api as api_mod
    from tensorstage.sim import steady

    if not steady._can_fork():
        pytest.skip("needs os.fork and two CPUs")
    plan = ParallelPlan.parse({"tp": 2, "pp": 2, "dp": 2, "global_batch": 80, "seq": 512, "recompute": "selective"})
    monkeypatch.setattr(api_mod, "STEADY_WORKERS", 2)
    forked = api_mod.simulate("gpt3-125m", "dgx-a100-selene", plan).result
    monkeypatch.setattr(api_mod, "STEADY_WORKERS", 1)
    serial = api_mod.simulate("gpt3-125m", "dgx-a100-selene", plan).result
    assert pickle.dumps(forked) == pickle.dumps(serial)


def test_forked_runs_rerun_a_child_that_died_and_raise_a_childs_error() -> None:
    """A child that ends without a result is rerun in this process; a child's exception is raised here."""
    import os
    import signal

    from tensorstage.sim import steady

    if not steady._can_fork():
        pytest.skip("needs os.fork and two CPUs")

    def dies():
        os.kill(os.getpid(), signal.SIGKILL)

    with steady._forked_results([lambda: 41, dies]) as collect:
        got = collect()
    assert got == [41, None]

    def fails():
        raise ValueError("bad short run")

    with pytest.raises(ValueError, match="bad short run"), steady._forked_results([fails]) as collect:
        collect()
