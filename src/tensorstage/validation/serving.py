"""Serving validation: every published point of ``public_serving_cases.yaml`` through ``serve.simulate``.

Each case names hardware, engine, model, precision, parallelism and workload; each measured point
becomes one simulation with the engine profile that matches how it was measured (nothing fitted):

* ``static_batch_throughput`` (TensorRT-LLM gptSessionBenchmark): the ``static`` profile with
  ``max_num_seqs`` = the row's batch, one batch of identical requests; output tokens/s per GPU =
  batch x OSL / batch wall time / TP (the source's own definition).
* ``ttft_vs_prompt_length_batch1``: one request with one output token on an idle ``static``
  engine: TTFT = one batch-1 prefill.
* ``static_batch_throughput_and_ttft``: the batch-64 row's throughput and first-token latency,
  the batch-1 row's first-token latency and its decode rate as TPOT (``tpot_batch1``: 1 / its
  output tokens/s against the simulated batch-1 TPOT, at the other row's output length).
* ``offline_throughput_ifb`` (trtllm-bench throughput): the ``trtllm`` profile, all requests at
  t = 0, total output tokens/s of the TP group; attention-DP with EP over the TP GPUs where the
  case's layout note says the run enabled attention DP, plain TP otherwise.
* MLPerf Offline / Server (``offline_throughput_mlperf``, ``online_serving_poisson_mlperf``): the
  ``trtllm`` profile with the submission's ``gpu_batch_size`` as the batch limit and its
  ``kvcache_free_gpu_mem_frac``, TP x replicas as configured, requests drawn at random from the
  dataset's rows (:data:`DATASET_LENGTHS`: the MLPerf Llama-2-70B set's 24,576 prompt lengths and
  reference-answer lengths). The model's answers are longer than the GPT-4 references the file
  counts (290.3 vs 218.9 tokens on average), so each row's output length is scaled by the run's own
  output tokens per sample (tokens/s over samples/s of the same log: a property of the workload,
  not of the engine). Offline: as many samples as the run's minimum duration took at the measured
  rate, all at t = 0; output tokens/s. Server: Poisson arrivals at the target rate for MLPerf's
  600 s minimum duration; p99 TTFT and p99 TPOT against the measured p99s and the SLOs (the
  verdict, met or missed, is what must agree).

Engine release: a TensorRT-LLM case older than 0.7 runs with ``gqa_kv_reuse`` off (its generation
attention was the masked-MHA kernel, one thread block per query head, so a GQA model's KV cache is
read once per query head; :data:`TRTLLM_GQA_KV_REUSE_SINCE`); 0.7 and later read each KV head once.

Precision: ``FP8`` cases run fp8 weights and fp8 KV cache, the others 16-bit. Systems: the DGX
preset of the case's GPU. Models: the preset of the case's model key; GPT-J-6B and Falcon-180B are
built from their Hugging Face configs (:data:`EXTRA_MODELS`, dims cited per field). Cases without
usable dimensions or with an unstated parallel layout are skipped with the reason.
MAPE is reported per kind; every number is produced by the code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.fileio import read_yaml_file
from tensorstage.hardware.system import load_system
from tensorstage.model.presets import find_preset
from tensorstage.model.spec import ModelSpec
from tensorstage.serve import RequestTable, ServingPlan, Workload, load_profile, simulate
from tensorstage.serve.serving import build_predictor
from tensorstage.serve.traces import load_lengths
from tensorstage.validation.cases import select_ids

SERVING_CASES_RELATIVE = Path("shared") / "validation" / "public_serving_cases.yaml"

#: metric groups MAPE is reported for
KIND_STATIC = "static_batch_throughput"
KIND_TTFT = "ttft_batch1"
KIND_IFB = "offline_throughput_ifb"
KIND_STATIC_TTFT = "static_batch_ttft"
KIND_TPOT = "tpot_batch1"

KIND_MLPERF_OFFLINE = "offline_throughput_mlperf"
KIND_MLPERF_P99 = "mlperf_server_p99_latency"

#: case kinds mapped to simulations
SIMULATED_KINDS = ("static_batch_throughput", "ttft_vs_prompt_length_batch1", "static_batch_throughput_and_ttft",
                   "offline_throughput_ifb", "offline_throughput_mlperf", "online_serving_poisson_mlperf")
#: Datasets' per-sample token counts (``input_length,output_length`` CSV), keyed by a phrase of the
#: case's ``workload.dataset``. MLPerf Llama-2-70B (OpenOrca, 24,576 samples, Llama-2 tokenizer, chat
#: template included): openshift-psap/performance-dashboard@7cd1065d1e2c53ee745cbda08e2a8f13a42c93bb
#: mlperf-data/summaries/llama2-70b-99.csv (Apache-2.0), ``tok_input_length`` / ``tok_output_length``
#: of MLCommons' open_orca_gpt4_tokenized_llama.sampled_24576.pkl; sha256 83b5ef20...6916.
DATASET_LENGTHS: dict[str, Path] = {
    "MLPerf llama2-70b dataset": Path(__file__).parent / "data" / "mlperf_llama2_70b_lengths.csv",
}
#: MLPerf LoadGen's minimum run for the Server scenario (mlperf.conf ``*.Server.min_duration = 600000`` ms)
MLPERF_SERVER_MIN_DURATION_S = 600.0
#: Models the presets lack, from their Hugging Face ``config.json`` (source per model).
EXTRA_MODELS: dict[str, dict[str, Any]] = {
    "gpt-j-6b": dict(
        name="gpt-j-6b", family="gpt-j", num_layers=28, hidden=4096, num_heads=16, ffn=16384, vocab=50400,
        activation="gelu", norm="layernorm", positions="rope", mlp_bias=True, out_bias=False, max_seq=2048,
        source="huggingface.co/EleutherAI/gpt-j-6b config.json: n_layer 28, n_embd 4096, n_head 16, "
               "n_inner null (= 4 x n_embd), vocab_size 50400, rotary; the case file's build command agrees"),
    "falcon-180b": dict(
        name="falcon-180b", family="falcon", num_layers=80, hidden=14848, num_heads=232, num_kv_heads=8,
        head_dim=64, ffn=59392, vocab=65024, activation="gelu", norm="layernorm", positions="rope",
        max_seq=2048,
        source="huggingface.co/tiiuae/falcon-180B config.json: hidden_size 14848, num_attention_heads 232, "
               "num_kv_heads 8, num_hidden_layers 80, vocab_size 65024, MLP 4 x hidden"),
}
#: case model key -> preset name
MODEL_KEYS: dict[str, str] = {"llama3-70b": "llama3-70b"}
#: GPU name fragment -> system preset
SYSTEMS: tuple[tuple[str, str], ...] = (("H200", "dgx-h200"), ("H100", "dgx-h100-superpod"),
                                        ("A100", "dgx-a100-selene"))


@dataclass
class ServingPoint:
    """One measured value and its prediction."""

    case: str
    kind: str
    label: str
    measured: float
    predicted: float | None
    note: str = ""
    #: a pass/fail limit the metric is judged against (an SLO); ``None`` for plain points
    limit: float | None = None

    @property
    def verdicts(self) -> tuple[bool, bool | None] | None:
        """(measured meets the limit, predicted meets it), or ``None`` without a limit."""
        if self.limit is None:
            return None
        return self.measured <= self.limit, None if self.predicted is None else self.predicted <= self.limit

    @property
    def error_pct(self) -> float | None:
        """Signed error of the prediction, percent of the measurement."""
        if self.predicted is None:
            return None
        return 100.0 * (self.predicted - self.measured) / self.measured


def default_serving_cases_path(start: Path | None = None) -> Path:
    """``../shared/validation/public_serving_cases.yaml`` beside the repository (or the working dir)."""
    here = Path(__file__).resolve()
    cwd = (start or Path.cwd()).resolve()
    for root in (*here.parents, *cwd.parents, cwd):
        path = root / SERVING_CASES_RELATIVE
        if path.is_file():
            return path
    raise SpecError("--cases", f"no {SERVING_CASES_RELATIVE} found beside the repository; pass --cases FILE")


def _model(case: dict) -> ModelSpec | None:
    key = str(case.get("model", {}).get("key", ""))
    if key in EXTRA_MODELS:
        return ModelSpec(**EXTRA_MODELS[key])
    return find_preset(MODEL_KEYS.get(key, key))


def _system(case: dict) -> str | None:
    gpu = str(case.get("hardware", {}).get("gpu", ""))
    return next((name for frag, name in SYSTEMS if frag in gpu), None)


def _dtypes(case: dict) -> tuple[str, str | None]:
    return ("fp8", "fp8") if "FP8" in str(case.get("precision", "")).upper() else ("fp16", "fp16")


#: The first TensorRT-LLM release whose generation attention reads a GQA group's KV once (the XQA
#: kernel: docs/source/blogs/XQA-kernel.md, "2.4x more Llama-70B throughput"; the Falcon-180B/H200
#: blog of the 0.7 pre-release credits its GQA generation kernels with the same 2.4x over 0.5).
#: Earlier releases ran the masked-MHA kernel, one thread block per query head.
TRTLLM_GQA_KV_REUSE_SINCE = (0, 7)


def _engine_knobs(case: dict) -> dict[str, Any]:
    """Engine-profile fields the case's engine release fixes (module docstring)."""
    eng = case.get("engine") or {}
    if "tensorrt-llm" not in str(eng.get("name", "")).lower():
        return {}
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(eng.get("version", "")))
    if m is None:
        return {}
    return {"gqa_kv_reuse": (int(m.group(1)), int(m.group(2))) >= TRTLLM_GQA_KV_REUSE_SINCE}


def _tp(case: dict, point: dict) -> int | None:
    if isinstance(point.get("tp"), int):
        return int(point["tp"])
    par = case.get("parallelism", {}) or {}
    if isinstance(par.get("tp"), int):
        return int(par["tp"])
    m = re.fullmatch(r"TP(\d+)", str(par.get("layout", "")).split(" ")[0])
    return int(m.group(1)) if m else None


def _fixed(n: int, isl: int, osl: int) -> RequestTable:
    return RequestTable.of(np.zeros(n), np.full(n, isl), np.full(n, osl))


class _Runner:
    """Simulates points, reusing one predictor per (model, system, tp, dtypes)."""

    def __init__(self) -> None:
        self._pred: dict[tuple, Any] = {}

    def run(self, spec: ModelSpec, system: str, tp: int, dtypes: tuple[str, str | None], engine: str,
            req: RequestTable, attention_dp: bool = False, replicas: int = 1, **overrides: Any):
        prof = load_profile(engine, **overrides)
        plan = ServingPlan(engine=prof, tp=tp, weight_dtype=dtypes[0], kv_dtype=dtypes[1], attention_dp=attention_dp,
                           replicas=replicas)
        key = (spec.name, system, tp, dtypes, attention_dp, prof.gqa_kv_reuse, prof.fused_gate_up)
        sysm = load_system(system)
        if key not in self._pred:
            self._pred[key] = build_predictor(spec, sysm, plan)
        return simulate(spec, sysm, plan, req, predictor=self._pred[key])


def _dataset_requests(case: dict, n: int, out_per_sample: float, rate_per_s: float | None) -> RequestTable:
    """``n`` requests drawn (seeded) from the case's dataset rows (a :class:`Workload` with the length
    file), offline or Poisson at ``rate_per_s``, outputs scaled to ``out_per_sample`` on average."""
    dataset = str((case.get("workload") or {}).get("dataset", ""))
    path = next((p for phrase, p in DATASET_LENGTHS.items() if phrase in dataset), None)
    if path is None:
        raise LookupError("no per-sample lengths for the case's dataset")
    arrival = dict(arrival="offline") if rate_per_s is None else dict(arrival="poisson", rate_per_s=rate_per_s)
    req = Workload(n, 1, 1, lengths_file=str(path), **arrival).requests()
    scale = out_per_sample / load_lengths(path)[1].mean()  # the dataset's mean, not the sample's
    osl = np.clip(np.rint(req.output_tokens * scale), 1, None).astype(np.int64)
    return RequestTable.of(req.arrival_s, req.prompt_tokens, osl)


def _mlperf_points(case: dict, runner: _Runner, spec: ModelSpec, system: str,
                   dtypes: tuple[str, str | None]) -> list[ServingPoint]:
    """An MLPerf Offline or Server result through the submission's own engine settings (module docstring)."""
    cid, par = case["id"], case.get("parallelism") or {}
    meas, wl = case.get("measured") or {}, case.get("workload") or {}
    tp, replicas = int(par.get("tp", 1)), int(par.get("replicas", 1))
    knobs = dict(max_num_seqs=int(par.get("gpu_batch_size", 2048)),
                 kv_mem_fraction=float(par.get("kvcache_free_gpu_mem_frac", 0.9)))
    label = f"TP{tp}x{replicas}"
    if case["kind"] == "offline_throughput_mlperf":
        out_per_sample = float(meas["tokens_per_s"]) / float(meas["samples_per_s"])
        n = int(np.ceil(float(meas["samples_per_s"]) * float(wl.get("min_duration_s", 600))))
        res = runner.run(spec, system, tp, dtypes, "trtllm", _dataset_requests(case, n, out_per_sample, None),
                         replicas=replicas, **knobs)
        return [ServingPoint(cid, KIND_MLPERF_OFFLINE, f"{label} x{n}", float(meas["tokens_per_s"]),
                             res.metrics.output_tokens_per_s)]
    qps = float(wl["target_qps"])
    out_per_sample = float(meas["tokens_per_s"]) / float(meas["completed_samples_per_s"])
    n = int(np.ceil(qps * MLPERF_SERVER_MIN_DURATION_S))
    res = runner.run(spec, system, tp, dtypes, "trtllm", _dataset_requests(case, n, out_per_sample, qps),
                     replicas=replicas, **knobs)
    slo = wl.get("slo") or {}
    return [ServingPoint(cid, KIND_MLPERF_P99, f"{label} {qps:g}/s p99 TTFT ms", float(meas["ttft_ms"]["p99"]),
                         res.metrics.ttft_s["p99"] * 1e3, limit=float(slo["ttft_ms"])),
            ServingPoint(cid, KIND_MLPERF_P99, f"{label} {qps:g}/s p99 TPOT ms", float(meas["tpot_ms"]["p99"]),
                         res.metrics.tpot_s["p99"] * 1e3, limit=float(slo["tpot_ms"]))]


def _points(case: dict, runner: _Runner) -> list[ServingPoint]:
    cid, kind = case["id"], case["kind"]
    if kind not in SIMULATED_KINDS:
        raise LookupError(f"kind {kind} not simulated")
    spec, system, dtypes = _model(case), _system(case), _dtypes(case)
    if spec is None or system is None:
        raise LookupError("model dimensions or system not available")
    if kind in ("offline_throughput_mlperf", "online_serving_poisson_mlperf"):
        return _mlperf_points(case, runner, spec, system, dtypes)
    out: list[ServingPoint] = []
    # the source's own layout note says when attention data parallelism (with EP) was on
    adp = "attention dp" in str((case.get("parallelism") or {}).get("layout", "")).lower()
    knobs = _engine_knobs(case)
    for p in case.get("measured_points", []):
        tp = _tp(case, p)
        if tp is None:
            raise LookupError("parallel layout not stated")
        isl, osl = int(p.get("isl", 0)), int(p.get("osl", 1) or 1)
        try:
            if kind == "static_batch_throughput":
                bs = int(p["batch_size"])
                measured = p.get("out_tok_s_per_gpu", p.get("out_tok_s_as_printed"))
                note = "" if "out_tok_s_per_gpu" in p else "unit ambiguous in the source; read as per GPU"
                res = runner.run(spec, system, tp, dtypes, "static", _fixed(bs, isl, osl), max_num_seqs=bs, **knobs)
                pred = bs * osl / res.metrics.makespan_s / tp
                out.append(ServingPoint(cid, KIND_STATIC, f"BS{bs} TP{tp} {isl}/{osl}", float(measured), pred, note))
            elif kind == "ttft_vs_prompt_length_batch1":
                res = runner.run(spec, system, tp, dtypes, "static", _fixed(1, isl, 1), max_num_seqs=1, **knobs)
                out.append(ServingPoint(cid, KIND_TTFT, f"TP{tp} ISL {isl}", float(p["ttft_ms"]),
                                        res.metrics.ttft_s["p50"] * 1e3))
            elif kind == "static_batch_throughput_and_ttft":
                bs = int(p["batch_size"])
                res = runner.run(spec, system, tp, dtypes, "static", _fixed(bs, isl, osl), max_num_seqs=bs, **knobs)
                if bs == 1:
                    out.append(ServingPoint(cid, KIND_TTFT, f"TP{tp} ISL {isl}", float(p["first_token_latency_ms"]),
                                            res.metrics.ttft_s["p50"] * 1e3))
                    gen = int(p.get("osl") or max([int(q.get("osl", 0) or 0) for q in case["measured_points"]]))
                    if "out_tok_s" in p and gen > 0:
                        # the batch-1 decode rate: TPOT = 1 / (output tokens/s); the row states no
                        # output length, so the case's other rows' is used
                        one = runner.run(spec, system, tp, dtypes, "static", _fixed(1, isl, gen), max_num_seqs=1,
                                         **knobs)
                        out.append(ServingPoint(cid, KIND_TPOT, f"TP{tp} {isl}/{gen}", 1e3 / float(p["out_tok_s"]),
                                                one.metrics.tpot_s["p50"] * 1e3,
                                                "measured = 1 / output tokens/s of the batch-1 row"))
                    continue
                out.append(ServingPoint(cid, KIND_STATIC, f"BS{bs} TP{tp} {isl}/{osl} (total)",
                                        float(p["out_tok_s"]), bs * osl / res.metrics.makespan_s))
                out.append(ServingPoint(cid, KIND_STATIC_TTFT, f"BS{bs} TP{tp} ISL {isl}",
                                        float(p["first_token_latency_ms"]), res.metrics.ttft_s["p50"] * 1e3))
            elif kind == "offline_throughput_ifb":
                n = int(p["num_requests"])
                res = runner.run(spec, system, tp, dtypes, "trtllm", _fixed(n, isl, osl), attention_dp=adp,
                                 **knobs)
                out.append(ServingPoint(cid, KIND_IFB, f"TP{tp} {isl}/{osl} x{n}", float(p["total_out_tok_s"]),
                                        res.metrics.output_tokens_per_s))
        except SpecError as exc:  # e.g. the batch does not fit: a prediction failure, reported
            out.append(ServingPoint(cid, kind, f"TP{tp} {isl}/{osl}", float(next(
                (v for k, v in p.items() if k.startswith(("out_tok", "ttft", "total_out"))), 0.0)), None, str(exc)))
    return out


def run_serving_validation(path: Path, only: str | None = None,
                           progress: Callable[[str], None] | None = None) -> tuple[list[ServingPoint], list[tuple[str, str]]]:
    """Predict every point of the cases file; returns (points, skipped cases with reasons)."""
    doc = read_yaml_file(path, "serving cases file")
    cases = doc.get("cases", []) if isinstance(doc, dict) else []
    cases = select_ids(cases, only, lambda c: c.get("id", ""), "serving case")
    runner = _Runner()
    points: list[ServingPoint] = []
    skipped: list[tuple[str, str]] = []
    for case in cases:
        if progress is not None:
            progress(str(case.get("id")))
        if case.get("underspecified") and "layout" in str(case.get("underspecified")):
            skipped.append((case["id"], f"underspecified: {case['underspecified']}"))
            continue
        try:
            points += _points(case, runner)
        except LookupError as exc:
            skipped.append((case["id"], str(exc).strip("'\"")))
    return points, skipped


def serving_report(points: list[ServingPoint], skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """JSON-ready results: every point, MAPE per kind, skipped cases."""
    kinds: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(p.kind for p in points):
        errs = [abs(p.error_pct) for p in points if p.kind == kind and p.error_pct is not None]
        kinds[kind] = {
            "n": len(errs),
            "failed": sum(1 for p in points if p.kind == kind and p.predicted is None),
            "mape_pct": round(float(np.mean(errs)), 2) if errs else None,
            "max_abs_error_pct": round(float(np.max(errs)), 2) if errs else None,
        }
    return {
        "points": [{"case": p.case, "kind": p.kind, "point": p.label, "measured": p.measured,
                    "predicted": None if p.predicted is None else round(p.predicted, 4),
                    "error_pct": None if p.error_pct is None else round(p.error_pct, 2), "note": p.note,
                    **({} if p.verdicts is None else {"limit": p.limit, "measured_meets_limit": p.verdicts[0],
                                                      "predicted_meets_limit": p.verdicts[1]})}
                   for p in points],
        "kinds": kinds,
        "skipped": [{"case": c, "reason": r} for c, r in skipped],
    }


__all__ = ["DATASET_LENGTHS", "EXTRA_MODELS", "ServingPoint", "default_serving_cases_path", "run_serving_validation", "serving_report"]
