"""`tensorstage generate`: real lowering -> Chakra ET files; structure, determinism, totals, bad plans.

Independent checks: every written trace decodes and passes the validator (dependencies exist, no
cycles, sends matched by receives, groups contain their ranks); the DP gradient all-reduce of a
``tp=1, pp=1`` plan moves exactly the model's parameters in fp32, counted here from the torch
reference decoder (tests/torchref_models.py) plus Megatron's vocabulary padding; bad plans fail
with one line naming the rule, exit code 2 and no output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensorstage.model import resolve_model
from tensorstage.trace import validate_trace_dir
from tests.support import run_main

DATA = Path(__file__).parent / "data"
TINY_MOE = str(DATA / "models" / "tiny-moe.yaml")
#: ``-c`` an empty plan: flags then apply over ParallelPlan's field defaults (1 GPU), not the default plan.
FIELD_DEFAULTS = ["-c", str(DATA / "plan_field_defaults.yaml")]
TINY_DENSE = """\
name: tiny-dense
num_layers: 4
hidden: 128
num_heads: 4
num_kv_heads: 2
ffn: 320
vocab: 1000
max_seq: 512
source: test
"""


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def dense_yaml(tmp_path: Path) -> str:
    path = tmp_path / "tiny-dense.yaml"
    path.write_text(TINY_DENSE)
    return str(path)


PLANS = [
    ["--tp", "2", "--pp", "2", "--dp", "2", "--ep", "2", "--sp", "--seq", "128", "--zero", "1"],
    ["--pp", "2", "--dp", "4", "--ep", "4", "--seq", "128", "--zero", "3", "--schedule", "zb-h1"],
    ["--pp", "2", "--vpp", "2", "--cp", "2", "--dp", "2", "--seq", "128", "--schedule", "interleaved",
     "--global-batch", "8"],
    ["--tp", "2", "--pp", "2", "--dp", "2", "--seq", "128", "--phase", "decode", "--context", "256"],
]


@pytest.mark.parametrize("plan", PLANS, ids=["tp-sp-ep-zero1", "ep-zero3-zbh1", "interleaved-cp", "decode"])
def test_generated_traces_validate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path, plan: list[str]) -> None:
    out = tmp_path / "t"
    res = run_main(monkeypatch, capsys, "generate", TINY_MOE, *FIELD_DEFAULTS, *plan, "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    manifest = json.loads(res.stdout)
    world = manifest["world"]
    assert manifest["files"]["count"] == world == len(list(out.glob("trace.*.et")))
    report = validate_trace_dir(out)
    assert report.ok, report.errors[:5]
    assert report.ranks == world
    assert manifest["inputs"]["model"] == TINY_MOE and manifest["inputs"]["plan"]["world"] == world
    first, last = manifest["classes"]["0"], manifest["classes"]["1"]  # pp=2 everywhere
    assert first["send_bytes"] == last["recv_bytes"] > 0  # activations forward
    assert last["send_bytes"] == first["recv_bytes"]  # gradients back (none in inference)
    assert (last["send_bytes"] > 0) == ("decode" not in plan)
    assert all(c["model_flops"] > 0 for c in manifest["classes"].values())


def test_deterministic_and_worker_count_independent(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["generate", TINY_MOE, *FIELD_DEFAULTS, "--tp", "2", "--pp", "2", "--dp", "2", "--ep", "2", "--sp", "--seq", "128"]
    digests = []
    for i, workers in enumerate(["1", "1", "2"]):
        out = tmp_path / f"run{i}"
        res = run_main(monkeypatch, capsys, *args, "--out", str(out), "--workers", workers)
        assert res.returncode == 0, res.stderr
        digests.append(_digest(out))
    assert digests[0] == digests[1] == digests[2]
    assert "8 ranks, 2 classes" in res.stdout  # the summary table


def test_classes_only_and_json_traces(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    out = tmp_path / "c"
    res = run_main(monkeypatch, capsys, "generate", TINY_MOE, *FIELD_DEFAULTS, "--pp", "2", "--dp", "2", "--seq", "128",
                "--out", str(out), "--classes-only", "--prefix", "x")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("x.class*")) == ["x.class0.et", "x.class0.json", "x.class1.et",
                                                           "x.class1.json"]
    rank_classes = json.loads((out / "x.rank_classes.json").read_text())
    assert rank_classes["rank_to_class"] == [0, 0, 1, 1]  # pp outermost: ranks 0,1 stage 0
    out2 = tmp_path / "j"
    res = run_main(monkeypatch, capsys, "generate", TINY_MOE, *FIELD_DEFAULTS, "--pp", "2", "--seq", "128", "--out", str(out2),
                "--json-traces")
    assert res.returncode == 0, res.stderr
    assert len(list(out2.glob("trace.class*.json"))) == 2 and len(list(out2.glob("trace.*.et"))) == 2


def test_dp_all_reduce_moves_every_parameter_in_fp32(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     dense_yaml: str) -> None:
    from torchref_models import reference_param_count

    spec = resolve_model(dense_yaml)
    padded_vocab = -(-spec.vocab // 128) * 128  # Megatron: make_vocab_size_divisible_by=128 (x tp=1)
    params = reference_param_count(spec) + 2 * (padded_vocab - spec.vocab) * spec.hidden  # embedding + head
    res = run_main(monkeypatch, capsys, "generate", dense_yaml, *FIELD_DEFAULTS, "--dp", "4", "--seq", "64", "--out",
                str(tmp_path / "d"), "--json")
    assert res.returncode == 0, res.stderr
    (cls,) = json.loads(res.stdout)["classes"].values()
    assert cls["collective_bytes"] == {"ALL_REDUCE": {"dp": 4 * params}}
    # static memory: bf16 weights 2 + fp32 main grads 4 + fp32 master 4 + Adam 8 bytes per parameter
    assert cls["static_bytes"] == {"weights": 2 * params, "gradients": 4 * params,
                                   "optimizer_states": 8 * params, "master_weights": 4 * params}


BAD = [
    (["--tp", "3"], "tp: num_heads=8"),  # heads vs TP
    (["--tp", "4"], "tp: num_kv_heads=2"),  # KV heads vs TP
    (["--pp", "3"], "pp: num_layers=4 must be divisible by pp*vpp"),  # layers vs PP x VPP
    (["--pp", "2", "--vpp", "4", "--schedule", "interleaved", "--global-batch", "2"], "pp: num_layers=4"),
    (["--dp", "3", "--ep", "3"], "ep: num_experts=8"),  # experts vs EP
    (["--dp", "2", "--micro-batch", "2", "--global-batch", "6"], "global_batch: global_batch=6"),
    (["--dp", "2", "--world", "16"], "world: plan needs"),  # world size mismatch
    (["--cp", "2", "--seq", "130"], "seq: seq=130"),  # sequence vs CP
]


@pytest.mark.parametrize("flags, rule", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_plans_one_line_exit_2_no_output(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path, flags: list[str], rule: str) -> None:
    out = tmp_path / "never"
    res = run_main(monkeypatch, capsys, "generate", TINY_MOE, *FIELD_DEFAULTS, *flags, "--out", str(out))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and rule in lines[0], res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "tensorstage.cli", "generate", TINY_MOE, *FIELD_DEFAULTS, "--tp", "3", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_tied_embeddings_across_stages_validate(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "tied.yaml"
    path.write_text(TINY_DENSE.replace("name: tiny-dense", "name: tiny-tied") + "tied_embeddings: true\n")
    out = tmp_path / "t"
    res = run_main(monkeypatch, capsys, "generate", str(path), *FIELD_DEFAULTS, "--pp", "4", "--dp", "2", "--seq", "64", "--out",
                str(out), "--json")
    assert res.returncode == 0, res.stderr
    report = validate_trace_dir(out)  # every communicator's members issue the same collectives
    assert report.ok, report.errors[:3]
    classes = json.loads(res.stdout)["classes"]
    # first and last stage exchange the fp32 embedding gradient (padded vocab 1024 x hidden 128)
    extra = classes["0"]["send_bytes"] - classes["1"]["send_bytes"] // 2
    assert extra == 1024 * 128 * 4


def test_byte_identical_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"s{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "COLUMNS": "200"}
        proc = subprocess.run([sys.executable, "-m", "tensorstage.cli", "generate", TINY_MOE, *FIELD_DEFAULTS, "--tp", "2", "--pp", "2",
                               "--dp", "2", "--ep", "2", "--sp", "--seq", "128", "--zero", "3", "--schedule", "zb-h1",
                               "--out", str(out), "--json-traces"], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        digests.append(_digest(out))
    assert digests[0] == digests[1]
