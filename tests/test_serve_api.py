"""``tensorstage.api.serve``: the function behind ``tensorstage serve`` gives what the command prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tensorstage
from tensorstage import api
from tensorstage.errors import SpecError
from tensorstage.report.console import _default
from tensorstage.serve import Workload
from tests.support import run_main


def test_api_serve_equals_cli_json(monkeypatch, capsys):
    """Same model, engine override, router, TP, replicas, workload and SLOs: the CLI's JSON document
    is the API's summary, key for key and value for value."""
    r = run_main(monkeypatch, capsys, "serve", "gpt3-125m", "--tp", "2", "--replicas", "2", "--router",
                 "least_tokens", "--qps", "80", "--requests", "60", "--isl", "96", "--osl", "12", "--lengths",
                 "lognormal", "--spread", "0.4", "--seed", "3", "--max-num-seqs", "8", "--slo-ttft-ms", "500",
                 "--slo-tpot-ms", "50", "--json")
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    wl = Workload(60, 96, 12, arrival="poisson", rate_per_s=80.0, lengths="lognormal", spread=0.4, seed=3)
    served = api.serve("gpt3-125m", "dgx-h100-superpod", wl, tp=2, replicas=2, router="least_tokens",
                       slo_ttft_ms=500, slo_tpot_ms=50, engine_overrides={"max_num_seqs": 8})
    assert json.loads(json.dumps(served.summary, default=_default)) == cli
    # the summary is the result's: every request finished once, with the requested output tokens
    req = served.result.requests
    assert cli["requests"] == 60 and np.isfinite(req.finish_s).all()
    assert cli["output_tokens"] == int(req.output_tokens.sum())
    assert cli["num_gpus"] == 4 and served.result.plan.engine.max_num_seqs == 8


def test_api_serve_default_workload_and_bad_input():
    """No workload: the CLI's default (1,000 offline requests of 1,024 + 256 tokens); bad SLOs are
    a one-field SpecError before any work."""
    served = api.serve("gpt3-125m")
    assert served.summary["requests"] == 1000 and served.summary["output_tokens"] == 1000 * 256
    assert served.summary["input_tokens"] == 1000 * 1024 and served.summary["system"] == api.DEFAULT_SYSTEM
    with pytest.raises(SpecError) as err:
        api.serve("gpt3-125m", slo_tpot_ms=0)
    assert err.value.field == "slo_tpot_ms"


def test_package_root_keeps_the_serve_package():
    """``api.serve`` is not re-exported at the root: ``tensorstage.serve`` stays the package."""
    import tensorstage.serve as pkg

    assert tensorstage.Served is api.Served
    assert tensorstage.serve is pkg and hasattr(pkg, "simulate")


def test_serving_loop_restores_the_cycle_collector():
    """The event loop pauses Python's cycle collector while it runs and leaves it as it found it."""
    import gc

    wl = Workload(4, 16, 2)
    assert gc.isenabled()
    api.serve("gpt3-125m", workload=wl)
    assert gc.isenabled()
    gc.disable()
    try:
        api.serve("gpt3-125m", workload=wl)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_summary_records_the_workload():
    """``serve --json`` (and the report) carry what is needed to run the same requests again."""
    from tensorstage import api
    from tensorstage.serve import Workload

    wl = Workload(40, 64, 8, arrival="gamma", rate_per_s=30.0, cv=2.0, lengths="uniform", spread=0.3, seed=5)
    served = api.serve("gpt3-125m", "dgx-a100-selene", wl, engine="vllm")
    assert served.summary["workload"] == {"arrival": "gamma", "requests": 40, "seed": 5, "rate_per_s": 30.0,
                                          "cv": 2.0, "input_tokens": 64, "output_tokens": 8, "lengths": "uniform",
                                          "spread": 0.3}
