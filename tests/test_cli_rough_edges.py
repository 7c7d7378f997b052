"""Rough edges a user hit on the CLI, each pinned by an independent expectation.

* ``run --json`` exists (the README says every command takes ``--json``) and prints the same
  document as ``result.json``; its tokens per step is the default plan's global batch x sequence.
* Plan YAML keys may be spelled as the flags (``global-batch``), as ``-c``'s help says.
* A YAML ``true`` in a numeric plan field (``tp: true``) and a non-boolean ``sp`` are rejected
  with one line naming the field, instead of silently becoming ``tp=1`` / ``sp=False``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorstage.cli import app
from tensorstage.errors import SpecError
from tensorstage.parallel.plan import ParallelPlan, load_plan

runner = CliRunner()


def test_run_json_prints_result_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "gpt3-125m", "--tp", "1", "--pp", "2", "--dp", "1", "--seq", "256",
                              "--global-batch", "4", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed == json.loads((out / "result.json").read_text())
    assert printed["tokens_per_step"] == 4 * 256  # global batch x sequence
    assert printed["tokens_per_s"] == pytest.approx(4 * 256 / printed["step_time_s"])


def test_plan_yaml_accepts_flag_spelling(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("tp: 2\ndp: 2\nglobal-batch: 16\nmicro-batch: 2\nrank-order: tp,dp,cp,pp\n")
    plan = load_plan(f)
    assert (plan.global_batch, plan.micro_batch) == (16, 2)
    assert plan.rank_order == ("tp", "dp", "cp", "pp")
    assert plan.microbatches == 16 // (2 * 2)  # global / (dp x micro)


def test_plan_yaml_still_rejects_unknown_dashed_key(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("tp: 2\nglobal-batches: 16\n")
    with pytest.raises(SpecError) as exc:
        load_plan(f)
    assert exc.value.field == f"{f}:2"


@pytest.mark.parametrize("field", ["tp", "pp", "seq", "global_batch", "zero", "routing_skew"])
def test_boolean_in_numeric_field_is_rejected(field: str) -> None:
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse({field: True})
    assert exc.value.field == f"plan.{field}"


def test_sp_must_be_a_boolean_even_when_tp_is_1() -> None:
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse({"sp": "maybe"})
    assert exc.value.field == "plan.sp"
    # the documented normalisation still holds: sp with tp=1 is a no-op (Megatron-LM)
    assert ParallelPlan.parse({"sp": True}).sp is False
    assert ParallelPlan.parse({"sp": True, "tp": 2}).sp is True


def test_bad_yaml_value_is_one_line_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("tp: true\n")
    code = "from tensorstage.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code, "simulate", "gpt3-125m", "--system", "dgx-a100-selene",
                          "-c", str(f), "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "tp" in res.stderr


@pytest.mark.parametrize(("ep", "skew", "ok"), [
    (4, 4.0, True),    # every token routes both copies to one rank: 4 x the mean (= ep)
    (4, 4.01, False),
    (2, 2.5, False),   # two ranks: the busiest holds at most all copies = 2 x the mean
    (8, 4.0, True),    # one expert per rank: at most every token -> num_experts / top_k = 4
    (8, 5.0, False),
    (1, 1.5, False),   # one rank always carries exactly the mean
])
def test_routing_skew_is_bounded_by_what_routing_can_do(ep: int, skew: float, ok: bool) -> None:
    from tensorstage.model import resolve_model

    spec = resolve_model(str(Path(__file__).parent / "data" / "models" / "tiny-moe.yaml"))
    assert (spec.moe.num_experts, spec.moe.top_k) == (8, 2)
    plan = ParallelPlan.parse({"dp": 8, "ep": ep, "routing_skew": skew})
    if ok:
        plan.validate_for(spec)
    else:
        with pytest.raises(SpecError) as exc:
            plan.validate_for(spec)
        assert exc.value.field == "routing_skew"


def test_explain_takes_the_plan_flag_name_for_the_micro_batch() -> None:
    def data(*flags: str) -> dict:
        res = runner.invoke(app, ["explain", "gpt3-125m", "--seq", "512", *flags, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    one, three = data("--batch", "1"), data("--micro-batch", "3")
    assert three["bindings"]["b"] == 3
    # every per-layer FLOP count is linear in the micro-batch b
    assert three["blocks"]["dense"]["fwd_flops"] == pytest.approx(3 * one["blocks"]["dense"]["fwd_flops"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "from tensorstage.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-rank traces of gpt3-125m, DP 2 x PP 2 (4 files, 2 rank classes)."""
    d = tmp_path_factory.mktemp("trace") / "t"
    res = runner.invoke(app, ["generate", "gpt3-125m", "--tp", "1", "--pp", "2", "--dp", "2", "--seq", "256",
                              "--global-batch", "4", "--out", str(d)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in d.glob("*.et")) == [f"trace.{r}.et" for r in range(4)]
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_trace_with_a_missing_rank_file_is_rejected(small_trace: Path, tmp_path: Path) -> None:
    d = _copy(small_trace, tmp_path / "t")
    (d / "trace.3.et").unlink()  # rank 3 is not its class's representative (rank 2 is)
    res = _cli("simulate", "--trace", str(d), "--system", "dgx-a100-selene", "--json")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "trace.3.et" in res.stderr


def test_trace_with_a_truncated_rank_file_is_rejected(small_trace: Path, tmp_path: Path) -> None:
    d = _copy(small_trace, tmp_path / "t")
    f = d / "trace.3.et"  # not decoded (rank 2 stands for its class): caught by the manifest's size
    f.write_bytes(f.read_bytes()[:100])
    res = _cli("simulate", "--trace", str(d), "--system", "dgx-a100-selene", "--json")
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("error: trace:")
    assert "truncated" in res.stderr


@pytest.mark.parametrize("extra", [["--tp", "2"], ["--dtype", "fp16"]])
def test_plan_flags_with_trace_are_an_error_not_ignored(small_trace: Path, extra: list[str]) -> None:
    res = _cli("simulate", "--trace", str(small_trace), "--system", "dgx-a100-selene", *extra)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("error: plan:")


def test_trace_only_flags_without_trace_are_an_error() -> None:
    res = _cli("simulate", "gpt3-125m", "--system", "dgx-a100-selene", "--trace-dtype", "fp16")
    assert res.returncode == 2 and res.stdout == "" and "--trace-dtype" in res.stderr


SYSTEM_YAML = """\
name: my-cluster
device: H100-SXM
gpus_per_node: 4
network:
  - {name: nvlink, scope: scale-up, topology: Switch, npus: 4, bandwidth_GBps: 450.0, latency_ns: 3400.0}
"""


def test_user_system_without_sources_names_every_field_that_needs_one(tmp_path: Path) -> None:
    f = tmp_path / "sys.yaml"
    f.write_text(SYSTEM_YAML)
    res = _cli("simulate", "gpt3-125m", "--system", str(f), "--tp", "4", "--pp", "1", "--dp", "1", "--seq", "2048",
               "--global-batch", "1", "--json")
    assert res.returncode == 2 and res.stdout == ""
    for field in ("gpus_per_node", "network.nvlink.bandwidth_GBps", "network.nvlink.latency_ns"):
        assert field in res.stderr
    sources = "".join(f"  {k}: 'ASSUMPTION: test'\n" for k in
                      ("gpus_per_node", "network.nvlink.bandwidth_GBps", "network.nvlink.latency_ns"))
    f.write_text(SYSTEM_YAML + "sources:\n" + sources)
    res = _cli("simulate", "gpt3-125m", "--system", str(f), "--tp", "4", "--pp", "1", "--dp", "1", "--seq", "2048",
               "--global-batch", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["world"] == 4  # tp 4 x dp 1 x pp 1


@pytest.mark.parametrize("phase", ["train", "prefill"])
def test_context_outside_decode_is_an_error_not_ignored(phase: str) -> None:
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse({"phase": phase, "seq": 1024, "context": 4096})
    assert exc.value.field == "context"
    assert ParallelPlan.parse({"phase": "decode", "seq": 1024, "context": 4096}).kv_len == 4096


@pytest.mark.parametrize(("plan", "field"), [
    ({"dp": 4, "zero": 0, "zero_shard_size": 2}, "zero_shard_size"),
    ({"dp": 2, "zero": 1, "fsdp_reshard_after_forward": "true"}, "fsdp_reshard_after_forward"),
])
def test_options_that_would_be_ignored_are_errors(plan: dict, field: str) -> None:
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse(plan)
    assert exc.value.field == field


@pytest.mark.parametrize("extra", [{"capacity_factor": 1.25}, {"routing_skew": 1.5}])
def test_moe_options_on_a_dense_model_are_errors(extra: dict) -> None:
    from tensorstage.model import resolve_model

    plan = ParallelPlan.parse(extra)
    with pytest.raises(SpecError) as exc:
        plan.validate_for(resolve_model("gpt3-125m"))
    assert exc.value.field == next(iter(extra))


def test_explain_reports_kv_bytes_once_and_right_in_every_phase() -> None:
    # Llama-3.1-8B: 32 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes (bf16)
    want = 32 * 8 * 128 * 2 * 2
    for phase in ("train", "decode"):
        res = runner.invoke(app, ["explain", "llama3.1-8b", "--phase", phase, "--seq", "256", "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["kv_cache_bytes_per_token"] == want
        assert "kv_cache_bytes_per_token" not in data["totals"]  # was 0.0 in train: contradicted the above


def test_validate_json_names_its_timing_with_a_unit() -> None:
    res = runner.invoke(app, ["validate", "--only", "MEM-ZERO-7.5B-64GPU", "--json"])
    assert res.exit_code == 0, res.output
    cases = json.loads(res.output)["cases"]
    assert len(cases) == 4
    for case in cases:
        assert "wall_s" in case and "seconds" not in case
        # ZeRO paper (Rajbhandari et al. 2020, Fig. 1): 120 / 31.4 / 16.6 / 1.9 GB for 7.5B on 64 GPUs
        assert case["predicted"] == pytest.approx(case["measured"], rel=0.02)


def test_simulate_json_peak_is_a_rate_and_mfu_follows_from_it() -> None:
    res = runner.invoke(app, ["simulate", "gpt3-125m", "--system", "dgx-a100-selene", "--seq", "512", "--json",
                              "--tp", "1", "--pp", "1", "--dp", "1", "--global-batch", "1"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["peak_flops_per_s_per_device"] == 312e12  # A100 dense BF16 datasheet
    # MFU = model FLOPs / (step time x GPUs x peak FLOP/s); model FLOPs summed from the classes
    model_flops = sum(c["ranks"] * c["model_flops"] for c in d["breakdown"]["classes"])
    assert d["mfu"] == pytest.approx(model_flops / (d["step_time_s"] * d["world"] * 312e12))
    # closed form per token: 6 x layer weights (12 h^2 each) + 6 h v (LM head) + causal attention
    # 7 h s per layer (2 forward, 5 flash backward); one sequence of 512 tokens
    h, v, s, layers = 768, 50257, 512, 12
    per_token = 6 * 12 * h * h * layers + 6 * h * v + 7 * h * s * layers
    assert model_flops == pytest.approx(s * per_token, rel=0.01)


@pytest.mark.parametrize("command", [
    ["run", "gpt3-125m", "--seq", "256", "--global-batch", "1", "--tp", "1", "--pp", "1", "--dp", "1", "--out"],
    ["generate", "gpt3-125m", "--seq", "256", "--tp", "1", "--pp", "1", "--dp", "1", "--out"],
    ["simulate", "gpt3-125m", "--seq", "256", "--tp", "1", "--pp", "1", "--dp", "1", "--system", "dgx-a100-selene",
     "--report"],
])
def test_an_unrelated_directory_is_never_replaced(tmp_path: Path, command: list[str]) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "manifest.json").write_text('{"name": "a web app"}')  # same name, not ours
    res = _cli(*command, str(mine))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    # an earlier output of the same command is replaced as before
    fresh = tmp_path / "fresh"
    for _ in range(2):
        res = _cli(*command, str(fresh))
        assert res.returncode == 0, res.stderr


def test_model_paths_that_are_not_models_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorstage.model import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt3-125m").mkdir()  # e.g. an output folder named after the model
    for name, words in (("notes.txt", ".json HF config"), ("empty", "without a config.json")):
        with pytest.raises(SpecError) as exc:
            resolve_model(name)
        assert exc.value.field == "model" and words in exc.value.reason
    spec = resolve_model("gpt3-125m")  # the preset still wins over a same-named folder
    assert (spec.num_layers, spec.hidden) == (12, 768)  # GPT-3 paper, Table 2.1


def test_unwritable_outputs_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    res = _cli("simulate", "gpt3-125m", "--system", "dgx-a100-selene", "--timeline", str(tmp_path), "--json")
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("error: timeline:")
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = _cli("simulate", "gpt3-125m", "--system", "dgx-a100-selene", "--seq", "512", "--tp", "1", "--pp", "1",
               "--dp", "1", "--timeline", str(blocker / "t.json"))
    assert "timeline: cannot write" in res.stderr
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_plan_yaml_takes_pp_layer_split_as_the_flag_does(tmp_path: Path) -> None:
    f = tmp_path / "plan.yaml"
    f.write_text("pp: 3\npp-layer-split: 3,5, 4\n")
    plan = load_plan(f)
    assert plan.pp_layer_split == (3, 5, 4)
    assert plan == load_plan(f, {}) == ParallelPlan.parse({"pp": 3, "pp_layer_split": [3, 5, 4]})


def test_a_closed_pipe_ends_the_command_like_a_unix_tool():
    """``tensorstage ... | head``: when the reader has gone, the command leaves quietly with status
    128 + SIGPIPE (141, as coreutils report it), not a traceback or rich's status 1."""
    import shutil
    import signal

    exe = shutil.which("tensorstage") or str(Path(sys.executable).parent / "tensorstage")
    for extra in ([], ["--json"]):  # a rich table, and plain JSON
        proc = subprocess.Popen([exe, "serve", "gpt3-125m", "--offline", "10", "--isl", "64", "--osl", "8", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the command prints its first line
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGPIPE, extra
        assert err == b"", extra
