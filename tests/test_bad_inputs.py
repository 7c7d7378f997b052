"""The scripted bad inputs of the shared testing corpus (bad-inputs.md), kept as regression tests.

Every row is a command a user might type with a mistake in it. The expected outcome is a one-line
``error: FIELD: ...`` on stderr with exit code 2, in well under a second (the slow successes of
the corpus are covered elsewhere), and nothing written or lost. Rows that once ran on silently
(``--dp 1e12``, ``--global-batch 0``, ``num_layers: true``) or ended in a traceback (binary plan,
system and cases files) are here with what they say now.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_main

SIM = ["simulate", "llama3.1-8b", "--system", "dgx-h100-superpod"]
MIX = ["simulate", "mixtral-8x7b", "--system", "dgx-h100-superpod"]
HF = {"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
      "intermediate_size": 1024, "vocab_size": 1000}
MODEL_YAML = "name: m\nnum_layers: 2\nhidden: 512\nnum_heads: 8\nffn: 1024\nvocab: 1000\n"

# (row, args, text the one error line must contain)
CASES: list[tuple[str, list[str], str]] = [
    ("1 tp0", [*SIM, "--tp", "0"], "error: plan.tp:"),
    ("2 tp-neg", [*SIM, "--tp", "-2"], "error: plan.tp:"),
    ("3 tp-float", [*SIM, "--tp", "1.5"], "'--tp'"),
    ("4 tp-abc", [*SIM, "--tp", "abc"], "'--tp'"),
    ("5 dp-1e12", [*SIM, "--dp", "1000000000000"], "error: world:"),
    ("6 tp-1e12", [*SIM, "--tp", "1000000000000"], "error: world:"),
    ("7 dp-2^63", [*SIM, "--dp", "9223372036854775808"], "int64"),
    ("8 gen-dp-1e12", ["generate", "llama3.1-8b", "--dp", "1000000000000", "--out", "g_huge"], "error: world:"),
    ("9 run-dp-1e12", ["run", "llama3.1-8b", "--dp", "1000000000000", "--out", "r_huge"], "error: world:"),
    ("10 seq0", [*SIM, "--seq", "0"], "error: plan.seq:"),
    ("11 seq-neg", [*SIM, "--seq", "-4096"], "error: plan.seq:"),
    ("13 gb0", [*SIM, "--global-batch", "0"], "error: global_batch:"),
    ("14 mb0", [*SIM, "--micro-batch", "0"], "error: plan.micro_batch:"),
    ("15 gb-notdiv", [*SIM, "--dp", "2", "--global-batch", "7"], "error: global_batch:"),
    ("16 gb-mb-notdiv", [*SIM, "--dp", "2", "--global-batch", "8", "--micro-batch", "3"], "error: global_batch:"),
    ("18 tp3-heads", [*SIM, "--tp", "3", "--no-sp", "--pp", "1", "--dp", "1"], "error: tp: num_heads=32"),
    ("19 tp16-kv8", [*SIM, "--tp", "16"], "error: tp: num_kv_heads=8"),
    ("20 tp64", [*SIM, "--tp", "64"], "error: tp:"),
    ("21 pp64", [*SIM, "--pp", "64"], "error: pp:"),
    ("22 pp33", [*SIM, "--pp", "33", "--tp", "1", "--dp", "1"], "error: "),
    ("23 vpp0", [*SIM, "--pp", "2", "--vpp", "0"], "error: plan.vpp:"),
    ("24 vpp-1f1b", [*SIM, "--pp", "2", "--vpp", "2", "--schedule", "1f1b"], "error: vpp:"),
    ("25 zero4", [*SIM, "--zero", "4"], "error: plan.zero:"),
    ("26 zero-neg", [*SIM, "--zero", "-1"], "error: plan.zero:"),
    ("27 dtype-int4", [*SIM, "--dtype", "int4"], "error: plan.dtype:"),
    ("28 fp8-a100", ["simulate", "llama3.1-8b", "--system", "dgx-a100-selene", "--dtype", "fp8"], "error: dtype:"),
    ("29 schedule-foo", [*SIM, "--schedule", "foo"], "error: plan.schedule:"),
    ("30 recompute-foo", [*SIM, "--recompute", "partial"], "error: plan.recompute:"),
    ("31 cp3", [*SIM, "--cp", "3"], "error: seq:"),
    ("32 cp-seq-notdiv", [*SIM, "--cp", "2", "--seq", "4097"], "error: seq:"),
    ("33 ep-dense", [*SIM, "--ep", "2", "--dp", "2"], "error: ep:"),
    ("34 ep3-mixtral", [*MIX, "--ep", "3", "--dp", "3", "--tp", "1", "--pp", "1", "--global-batch", "9"],
     "error: ep:"),
    ("35 ep-notdiv-dp", [*MIX, "--ep", "4", "--dp", "2"], "error: ep:"),
    ("36 ep16", [*MIX, "--ep", "16", "--dp", "16"], "error: "),
    ("37 rank-order-bad", [*SIM, "--rank-order", "tp,foo,dp,pp"], "error: rank_order:"),
    ("38 rank-order-dup", [*SIM, "--rank-order", "tp,tp,dp,pp"], "error: rank_order:"),
    ("39 split-badsum", [*SIM, "--pp", "2", "--pp-layer-split", "10,10"], "error: pp_layer_split:"),
    ("41 split-junk", [*SIM, "--pp", "2", "--pp-layer-split", "a,b"], "error: pp_layer_split:"),
    ("42 split-count", [*SIM, "--pp", "2", "--pp-layer-split", "10,10,12"], "error: pp_layer_split:"),
    ("43 capfactor-neg", [*MIX, "--capacity-factor", "-1"], "error: plan.capacity_factor:"),
    ("44 capfactor-nan", [*MIX, "--capacity-factor", "nan"], "error: plan.capacity_factor:"),
    ("45 skew-lt1", [*MIX, "--routing-skew", "0.5"], "error: plan.routing_skew:"),
    ("46 skew-inf", [*MIX, "--routing-skew", "inf"], "error: routing_skew:"),
    ("47 context-train", [*SIM, "--context", "1000"], "error: context:"),
    ("48 phase-foo", [*SIM, "--phase", "finetune"], "error: plan.phase:"),
    ("50 decode-ctx-neg", [*SIM, "--phase", "decode", "--context", "-5"], "error: plan.context:"),
    ("51 bucket0", [*SIM, "--dp", "2", "--dp-bucket-bytes", "0"], "error: plan.dp_bucket_bytes:"),
    ("52 zss3", [*SIM, "--dp", "4", "--zero", "3", "--zero-shard-size", "3"], "error: zero_shard_size:"),
    ("53 ddp-foo", [*SIM, "--ddp-style", "deepspeed"], "error: plan.ddp_style:"),
    ("54 reshard-foo", [*SIM, "--zero", "3", "--dp", "2", "--fsdp-reshard-after-forward", "maybe"],
     "error: plan.fsdp_reshard_after_forward:"),
    ("55 cpmode-foo", [*SIM, "--cp", "2", "--cp-mode", "ulysses"], "error: plan.cp_mode:"),
    ("56 world-mismatch", ["generate", "llama3.1-8b", "--tp", "2", "--dp", "2", "--world", "16", "--out", "g_world"],
     "error: world:"),
    ("57 unknown-model", ["simulate", "llama4-400b", "--system", "dgx-h100-superpod"], "error: model:"),
    ("59 unknown-system", ["simulate", "llama3.1-8b", "--system", "dgx-h999"], "error: system:"),
    ("60 unknown-hw", ["hardware", "h999"], "error: device:"),
    ("61 unknown-sys-show", ["systems", "foo"], "error: system:"),
    ("62 numgpus0", ["systems", "dgx-h100-superpod", "--num-gpus", "0"], "error: num_gpus:"),
    ("63 numgpus-neg", ["systems", "dgx-h100-superpod", "--num-gpus", "-8"], "error: num_gpus:"),
    ("65 numgpus-1e12", ["systems", "dgx-h100-superpod", "--num-gpus", "1000000000000"], "error: num_gpus:"),
    ("66 explain-seq0", ["explain", "llama3.1-8b", "--seq", "0"], "error: seq:"),
    ("67 explain-batch-neg", ["explain", "llama3.1-8b", "--batch", "-1"], "error: batch:"),
    ("68 explain-phase-foo", ["explain", "llama3.1-8b", "--phase", "foo"], "error: phase:"),
    ("69 explain-ctx0", ["explain", "llama3.1-8b", "--phase", "decode", "--context", "0"], "error: context:"),
    ("70 explain-optim-foo", ["explain", "llama3.1-8b", "--optimizer", "lion"], "error: optimizer:"),
    ("71 models-extra-arg", ["models", "foo"], "unexpected extra argument"),
    ("73 bad-command", ["simulat", "llama3.1-8b"], "No such command"),
    ("74 run-workers-neg", ["run", "--workers", "-1", "--out", "r_w"], "'--workers'"),
    ("75 run-traces-foo", ["run", "--traces", "maybe", "--out", "r_t"], "error: traces:"),
    ("76 hf-empty", ["show", "empty.json"], "error: empty.json"),
    ("77 hf-malformed", ["show", "malformed.json"], "error: malformed.json"),
    ("78 hf-binary", ["show", "binary.json"], "error: binary.json: not a UTF-8 text file"),
    ("79 hf-array", ["show", "array.json"], "error: array.json"),
    ("80 hf-missing", ["show", "missing.json"], "num_hidden_layers"),
    ("82 hf-neg", ["show", "neg.json"], "error: neg.json"),
    ("83 hf-zerolayers", ["show", "zerolayers.json"], "num_layers"),
    ("84 hf-badheads", ["show", "badheads.json"], "error: badheads.json"),
    ("85 hf-unknownarch", ["show", "unknownarch.json"], "unsupported architecture"),
    ("86 hf-floatdim", ["show", "floatdim.json"], "error: floatdim.json"),
    ("87 hf-nan", ["show", "nanjson.json"], "error: nanjson.json"),
    ("88 hf-hugelayers", ["show", "hugejson.json"], "num_layers"),
    ("89 hf-hugelayers-sim", ["simulate", "hugejson.json", "--system", "dgx-h100-superpod"], "num_layers"),
    ("90 hf-empty-sim", ["simulate", "empty.json", "--system", "dgx-h100-superpod"], "error: empty.json"),
    ("91 hf-binary-run", ["run", "binary.json", "--out", "r_bin"], "not a UTF-8 text file"),
    ("92 yaml-empty", ["show", "empty.yaml"], "error: empty.yaml"),
    ("93 yaml-malformed", ["show", "malformed.yaml"], "error: malformed.yaml"),
    ("94 yaml-binary", ["show", "binary.yaml"], "error: binary.yaml: not a UTF-8 text file"),
    ("95 yaml-pyobj", ["show", "pyobj.yaml"], "error: pyobj.yaml"),
    ("97 yaml-list", ["show", "list.yaml"], "error: list.yaml"),
    ("98 yaml-unknownfield", ["show", "unknownfield.yaml"], "hiden_size"),
    ("99 yaml-strval", ["show", "strval.yaml"], "num_layers"),
    ("100 yaml-negval", ["show", "negval.yaml"], "num_layers"),
    ("101 yaml-missing", ["show", "missing.yaml"], "hidden"),
    ("102 yaml-bool", ["show", "boolval.yaml"], "num_layers: expected a number, not true/false"),
    ("104 model-dir-empty", ["show", "emptydir"], "error: model:"),
    ("106 model-missing-file", ["show", "./nope.json"], "error: model:"),
    ("107 model-txt", ["show", "afile.txt"], "error: model:"),
    ("110 plan-malformed", [*SIM, "-c", "plan_malformed.yaml"], "error: plan_malformed.yaml:"),
    ("111 plan-unknown", [*SIM, "-c", "plan_unknown.yaml"], "unknown plan key 'tpp'"),
    ("112 plan-pyobj", [*SIM, "-c", "pyobj.yaml"], "error: pyobj.yaml:1:"),
    ("113 plan-str", [*SIM, "-c", "plan_str.yaml"], "plan_str.yaml.tp"),
    ("114 plan-float", [*SIM, "-c", "plan_float.yaml"], "plan_float.yaml.tp"),
    ("115 plan-bool", [*SIM, "-c", "plan_bool.yaml"], "plan_bool.yaml.sp"),
    ("117 plan-dir", [*SIM, "-c", "emptydir"], "error: emptydir: cannot read plan file"),
    ("118 plan-missing", [*SIM, "-c", "nope.yaml"], "error: nope.yaml: cannot read plan file"),
    ("119 plan-binary", [*SIM, "-c", "binary.yaml"], "error: binary.yaml: not a UTF-8 text file"),
    ("120 system-yaml-binary", ["simulate", "llama3.1-8b", "--system", "binary.yaml"],
     "error: binary.yaml: not a UTF-8 text file"),
    ("121 system-yaml-pyobj", ["simulate", "llama3.1-8b", "--system", "pyobj.yaml"], "error: system:"),
    ("122 system-yaml-empty", ["simulate", "llama3.1-8b", "--system", "empty.yaml"], "error: system:"),
    ("123 system-dir", ["simulate", "llama3.1-8b", "--system", "emptydir"], "error: system:"),
    ("124 hw-yaml-malformed", ["hardware", "malformed.yaml"], "error: device:"),
    ("126 trace-missing", ["simulate", "--trace", "nope", "--system", "dgx-h100-superpod"], "error: trace:"),
    ("127 trace-file", ["simulate", "--trace", "afile.txt", "--system", "dgx-h100-superpod"], "error: trace:"),
    ("128 trace-emptydir", ["simulate", "--trace", "emptydir", "--system", "dgx-h100-superpod"], "error: trace:"),
    ("132 sim-no-model", ["simulate", "--system", "dgx-h100-superpod"], "error: model:"),
    ("133 validate-cases-missing", ["validate", "--cases", "nope.yaml"], "error: --cases:"),
    ("134 validate-cases-empty", ["validate", "--cases", "empty.yaml"], "error: --cases:"),
    ("136 validate-cases-binary", ["validate", "--cases", "binary.yaml"], "not a UTF-8 text file"),
    ("137 validate-cases-pyobj", ["validate", "--cases", "pyobj.yaml"], "error: --cases:"),
    ("140 gen-out-userdir", ["generate", "llama3.1-8b", "--out", "userdir"], "error: out:"),
    ("141 run-out-userdir", ["run", "--out", "userdir"], "error: out:"),
    ("142 sim-report-userdir", [*SIM, "--report", "userdir"], "error: report:"),
    ("143 gen-out-file", ["generate", "llama3.1-8b", "--out", "afile.txt"], "error: out:"),
    ("144 run-out-file", ["run", "--out", "afile.txt"], "error: out:"),
    ("145 sim-timeline-existing", [*SIM, "--timeline", "mytimeline.json"], "error: timeline:"),
    ("146 sim-timeline-dir", [*SIM, "--timeline", "emptydir"], "error: timeline:"),
    ("149 gen-out-under-file", ["generate", "llama3.1-8b", "--out", "afile.txt/sub"], "error: out:"),
    ("155 gen-out-dot", ["generate", "llama3.1-8b", "--out", "."], "error: out:"),
]

FILES: dict[str, str | bytes] = {
    "empty.json": "", "malformed.json": '{"a": 1,\n', "binary.json": b"\xff\xfe\x00garbage",
    "binary.yaml": b"\xff\xfe\x00garbage", "array.json": "[1, 2]",
    "missing.json": json.dumps({k: v for k, v in HF.items() if k != "num_hidden_layers"}),
    "neg.json": json.dumps({**HF, "hidden_size": -512}), "zerolayers.json": json.dumps({**HF, "num_hidden_layers": 0}),
    "badheads.json": json.dumps({**HF, "num_attention_heads": 7}),
    "unknownarch.json": json.dumps({**HF, "architectures": ["MambaForCausalLM"]}),
    "floatdim.json": json.dumps({**HF, "hidden_size": 512.5}), "nanjson.json": '{"hidden_size": NaN}',
    "hugejson.json": json.dumps({**HF, "num_hidden_layers": 10**12}),
    "empty.yaml": "", "malformed.yaml": "a: [1, 2\nb: 3\n",
    "pyobj.yaml": "!!python/object/apply:os.system ['touch PWNED']\n",
    "list.yaml": "- 1\n- 2\n", "unknownfield.yaml": MODEL_YAML + "hiden_size: 3\n",
    "strval.yaml": MODEL_YAML.replace("num_layers: 2", "num_layers: two"),
    "negval.yaml": MODEL_YAML.replace("num_layers: 2", "num_layers: -2"),
    "missing.yaml": MODEL_YAML.replace("hidden: 512\n", ""),
    "boolval.yaml": MODEL_YAML.replace("num_layers: 2", "num_layers: true"),
    "afile.txt": "hello\n", "mytimeline.json": '{"mine": true}',
    "plan_malformed.yaml": "tp: 2\npp: [\n", "plan_unknown.yaml": "tp: 2\ntpp: 2\n", "plan_str.yaml": "tp: two\n",
    "plan_float.yaml": "tp: 2.5\n", "plan_bool.yaml": "sp: maybe\n",
}


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, content in FILES.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(args: list[str], expect: str, workdir: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(workdir)
    res = run_main(monkeypatch, capsys, *args)
    assert res.returncode == 2, (res.stdout[-500:], res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert expect in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert _snapshot(workdir) == before  # nothing written, nothing lost (no PWNED, no partial output)
    assert sorted(p.name for p in workdir.iterdir()) == sorted([*FILES, "emptydir", "userdir"])
