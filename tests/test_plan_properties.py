"""Property tests over random plans: either a clean one-line SpecError, or a simulated step that
satisfies invariants that hold for every correct plan:

* model FLOPs are conserved: summed over all ranks they equal the one-GPU plan's for the same
  global batch and sequence (parallelism splits the work, never adds or drops model math; the one
  known exception, norms replicated over TP ranks without SP, is bounded in the test);
* every rank class holds memory (> 0 bytes) and the step is at least as long as the busiest
  rank's compute;
* the GPU count is tp * cp * dp * pp.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tensorstage import api
from tensorstage.errors import SpecError
from tests.support import run_main

MODEL = str(Path(__file__).parent / "data" / "models" / "tiny-moe.yaml")  # 4 layers, 8 heads, 8 experts
SYSTEM = "dgx-h100-superpod"


@st.composite
def plans(draw: st.DrawFn) -> dict:
    """Mostly legal plans of the tiny model (so the invariants get exercised), some not."""
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]))
    return {
        "tp": draw(st.sampled_from([1, 2, 1, 2, 4])),  # 4 does not divide the 2 KV heads
        "pp": draw(st.sampled_from([1, 2, 4])),
        "dp": draw(st.sampled_from([1, 2])),
        "cp": draw(st.sampled_from([1, 1, 2])),
        "ep": draw(st.sampled_from([1, 1, 2, 4])),
        "etp": draw(st.sampled_from([None, None, 1])),  # 1: MoE parallel folding (EP over tp*cp*dp)
        "vpp": 2 if schedule == "interleaved" else 1,
        "sp": draw(st.booleans()),
        "zero": draw(st.sampled_from([0, 1, 2, 3])),
        "schedule": schedule,
        "recompute": draw(st.sampled_from(["none", "selective", "full"])),
        "seq": draw(st.sampled_from([64, 128])),
        "global_batch": draw(st.sampled_from([8, 16])),
        "micro_batch": draw(st.sampled_from([1, 2])),
    }


@cache
def _reference_model_flops(seq: int, global_batch: int) -> float:
    ref = api.simulate(MODEL, SYSTEM, api.make_plan(tp=1, pp=1, dp=1, cp=1, seq=seq, global_batch=global_batch,
                                                    micro_batch=1, zero=0, recompute="none", sp=False),
                       full=True)
    return sum(c.ranks * c.model_flops for c in ref.result.classes)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_random_plans_fail_cleanly_or_hold_the_invariants(flags: dict) -> None:
    try:
        plan = api.make_plan(**flags)
        run = api.simulate(MODEL, SYSTEM, plan)
    except SpecError as exc:
        text = str(exc)
        assert "\n" not in text and exc.field, text
        event("rejected: " + exc.field)
        return
    event("simulated")
    res = run.result
    assert res.world == flags["tp"] * flags["cp"] * flags["dp"] * flags["pp"]
    total = sum(c.ranks * c.model_flops for c in res.classes)
    ref = _reference_model_flops(flags["seq"], flags["global_batch"])
    if plan.tp > 1 and not plan.sp:
        # Known deviation (found by this test): without sequence parallelism every TP rank runs the
        # norms on the full activations, and those replicated element-wise FLOPs are counted as model
        # FLOPs on each rank (+0.2 % here, +0.08 % for GPT-3 125M). Matmuls are conserved exactly.
        assert ref <= total <= ref * 1.01
    else:
        assert total == pytest.approx(ref, rel=1e-6)
    assert all(c.memory_peak_bytes > 0 for c in res.classes)
    assert res.step_time_s >= max(c.compute_busy_s for c in res.classes) * (1 - 1e-9)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["--tp", "--pp", "--dp", "--seq", "--global-batch", "--zero", "--vpp"]),
                min_size=1, max_size=3),
       st.lists(st.sampled_from(["0", "-1", "3", "7", "1.5", "x", "99999999999999999999", "true"]),
                min_size=3, max_size=3))
def test_random_bad_flags_are_one_line(names: list[str], values: list[str]) -> None:
    import io
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    from tensorstage.cli import main

    args = ["simulate", MODEL, "--system", SYSTEM]
    for name, value in zip(names, values, strict=False):
        args += [name, value]
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["tensorstage", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: "), err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_a_tp_that_does_not_divide_the_heads_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(monkeypatch, capsys, "simulate", MODEL, "--system", SYSTEM, "--tp", "5")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
