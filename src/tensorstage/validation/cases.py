"""Reading ``public_cases.yaml`` and turning each case into what the simulator needs.

A case of the public file gives a model (dimensions or a size), a parallel configuration, a system
and one or more measured numbers. :func:`load_targets` maps each case to one or more
:class:`Target` s, one per measured number we predict, each with a :class:`Setup` (model spec,
plan, graph options, system) and an *extraction* (which number of the simulation is compared).

Mapping rules (the same for every case of a source family, never per-case tuning):

* Model: GPT family of the 2021-22 Megatron papers: learned positions, GeLU MLP (``ffn`` = 4h
  when not given), LayerNorm, biases, tied embeddings; vocabulary as given (Megatron pads it to
  a multiple of 128 x TP in the lowering).
* Graph conventions of the software that ran: Megatron-LM 2021-22 ran *unfused* attention
  (materialised ``s x s`` scores with scale/mask/softmax and dropout; the batched GEMMs compute
  the full square, so executed attention FLOPs are not halved for the causal mask) and dropout
  0.1 (1-byte masks). These select :class:`GraphOptions` (``attention_impl="materialized"``,
  ``attention_flops="full"``, ``dropout=True``, ``norm_stats=False`` as Korthikanti's formula).
* Plan: ``interleaved_chunks_per_stage`` > 1 -> ``schedule=interleaved, vpp=`` that;
  ``full``/``full_recompute`` -> ``recompute=full``; ``selective_recompute+sequence_parallel`` ->
  ``recompute=selective, sp=True``; fp16/bf16 mixed -> the named dtype.
* Unstated settings: where a source leaves a plan setting unstated (Narayanan Table 1 gives no
  micro-batch or schedule), :data:`COMPLETIONS` fills it with the setting of that source's
  published launch script, with the reason. These are configuration, not efficiency constants.
* Megatron-Core runs (source names Megatron-Core; 2023+): Transformer Engine's fused flash
  attention (causal: executed attention FLOPs halved), bf16, dropout 0.1 fused into its kernels,
  RoPE; the overlap flags the case lists (``--overlap-grad-reduce``, ``--overlap-param-gather``
  which needs the distributed optimizer = ZeRO-1, ``--tp-comm-overlap`` which needs SP) are set
  from its ``parallel.overlap`` text; SP whenever TP > 1 (Megatron-Core's recommended setting, and
  required by ``--tp-comm-overlap``). Tied or untied embeddings: whichever parameter count is
  closer to the case's stated ``params``.
* System: an ``A100`` case runs on the ``dgx-a100-selene`` preset, an ``H100`` one on
  ``dgx-h100-superpod``, resized to the case's GPU count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tensorstage.errors import SpecError
from tensorstage.graph.options import GraphOptions
from tensorstage.model.resolve import resolve_model
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel.plan import ParallelPlan

CASES_RELATIVE = Path("shared") / "validation" / "public_cases.yaml"

#: Groups a target can belong to; ``training`` is what ``mape_pct`` summarises.
GROUP_T5 = "korthikanti_t5"
GROUP_TRAINING = "training"
GROUP_LAYER = "layer"
GROUP_MEMORY = "memory"
GROUP_MCORE = "megatron_core_h100"
GROUP_TUNING = "tuning"
GROUP_HELD_OUT = "held_out"
GROUPS = (GROUP_T5, GROUP_TRAINING, GROUP_MCORE, GROUP_TUNING, GROUP_HELD_OUT, GROUP_LAYER, GROUP_MEMORY)

#: Cases the simulator's mechanisms and efficiencies were chosen on (docs/calibration.md, "Tuning and
#: held-out cases"): Korthikanti et al. 2022 Table 4 (per-layer times: the A100 matmul efficiency,
#: the GEMM shape model and Megatron's fused kernels were checked against them) and Table 5 (step
#: times: the optimizer passes and the NCCL base latency were kept because they moved these). Every
#: other step-time case is *held out*: nothing was set or kept by looking at it.
TUNING_CASE_PREFIXES = ("LAYER-KORTHIKANTI22-T4-", "TRAIN-KORTHIKANTI22-T5-")


def split_group(case_id: str) -> str:
    """``tuning`` or ``held_out`` for a step-time / layer-time case (see :data:`TUNING_CASE_PREFIXES`)."""
    return GROUP_TUNING if case_id.startswith(TUNING_CASE_PREFIXES) else GROUP_HELD_OUT

#: Graph conventions of Megatron-LM as used in Narayanan et al. 2021 and Korthikanti et al. 2022.
#: Megatron's fused bias-dropout-add, bias-GeLU and apex LayerNorm kernels (lower/megatron_fusion.py):
#: in Megatron-LM since 2020 (both papers' runs); see docs/calibration.md for the ablation
MEGATRON_FUSIONS = True
MEGATRON_2021_OPTIONS = dict(attention_impl="materialized", attention_flops="full", dropout=True,
                             norm_stats=False, megatron_fusions=MEGATRON_FUSIONS)

#: Graph conventions of Megatron-Core with Transformer Engine (see the module docstring).
MCORE_OPTIONS = dict(attention_impl="flash", attention_flops="causal_half", dropout=True, norm_stats=True,
                     megatron_fusions=MEGATRON_FUSIONS)

#: Settings a source leaves unstated, filled from that source's own launch script (per source).
COMPLETIONS: dict[str, dict[str, Any]] = {
    # Narayanan et al. SC21 Table 1 gives no micro-batch or schedule. Megatron-LM's launch script
    # for the same paper's GPT-3 configuration (examples/pretrain_gpt3_175B.sh, README "GPT-3
    # Example") runs --micro-batch-size 1 with the default (non-interleaved) 1F1B schedule.
    "TRAIN-NARAYANAN21-T1-": {"micro_batch": 1, "schedule": "1f1b"},
    "TRAIN-MEGATRON-README-GPT3-175B": {"micro_batch": 1, "schedule": "1f1b", "recompute": "full"},
    # Megatron-LM of 2021-22 (the "local" DDP of these papers) all-reduces gradients after the
    # backward pass (training.py train_step: model.allreduce_gradients() after forward_backward);
    # overlapping the reduction with the backward pass came with Megatron-Core's
    # --overlap-grad-reduce in 2023.
    "TRAIN-NARAYANAN21-": {"overlap_grad_reduce": False},
    "TRAIN-KORTHIKANTI22-": {"overlap_grad_reduce": False, "grad_dtype": "fp32"},  # (gradients: below)
    "TRAIN-MEGATRON-README-": {"overlap_grad_reduce": False},
    # "2240 GPUs = 8 data-parallel replicas of the 280-GPU Table 3 config": Table 3's micro-batch 1,
    # 3 interleaved chunks, batch 280 per replica.
    "TRAIN-KORTHIKANTI22-530B-2240GPU": {"micro_batch": 1, "vpp": 3, "global_batch": 2240},
    # Megatron-Core README weak/strong scaling: no micro-batch or schedule given; Megatron's own
    # defaults (--micro-batch-size as in its GPT examples: 1; no --num-layers-per-virtual-pipeline-stage
    # -> non-interleaved 1F1B).
    "TRAIN-MCORE-H100-": {"micro_batch": 1, "schedule": "1f1b"},
    # Strong scaling names no layout or flags; the case notes (and the README text) say it is the
    # 177B model of the weak-scaling table of the same README revision, which ran TP8 PP6 with
    # these overlap flags.
    "TRAIN-MCORE-H100-STRONG-177B": {"tp": 8, "pp": 6,
                                     "overlap": "--overlap-grad-reduce --overlap-param-gather --tp-comm-overlap"},
    # ZeRO Fig. 1 names a 7.5B model only by size: Megatron's 7.5B GPT (Narayanan Table 1).
    "MEM-ZERO-7.5B": {"preset": "megatron-7.5b"},
    # Korthikanti et al. 2022 state "fp16/bf16"; the case file's own Fig. 1 model state is 18 bytes
    # per parameter (fp32 gradients: bf16, which Megatron accumulates in fp32, or fp16 with
    # --accumulate-allreduce-grads-in-fp32), so their gradients are fp32. Narayanan et al. and the
    # README GPT-3 run are plain --fp16 (their launch scripts): fp16 gradients, the fp16 default.
    "LAYER-KORTHIKANTI22-": {"grad_dtype": "fp32"},
    "MEM-KORTHIKANTI22-": {"grad_dtype": "fp32"},
}


@dataclass(frozen=True)
class Setup:
    """One simulation input: model, plan, graph options and system (by preset name and size)."""

    spec: ModelSpec
    plan: ParallelPlan
    options: GraphOptions
    system: str
    num_gpus: int

    def key(self) -> tuple:
        """Hashable identity (two targets of one case share a simulation)."""
        return (self.spec.model_dump_json(), self.plan.model_dump_json(), repr(self.options), self.system,
                self.num_gpus)


@dataclass(frozen=True)
class Target:
    """One measured number and how to predict it.

    ``extract`` names what is read from the prediction (see :mod:`tensorstage.validation.run`);
    ``groups`` the summaries it counts in; ``args`` extra inputs of the extraction (e.g. the other
    setups of a relative-memory case).
    """

    id: str
    case_id: str
    kind: str
    metric: str
    unit: str
    measured: float
    extract: str
    setup: Setup | None
    groups: tuple[str, ...]
    note: str = ""
    args: dict[str, Any] = field(default_factory=dict)


# --- file ------------------------------------------------------------------------------------------


def default_cases_path(start: Path | None = None) -> Path:
    """``../shared/validation/public_cases.yaml`` next to the repository (or the working directory).

    Looks beside every parent of this package's source file and of ``start`` (default: the
    working directory); raises :class:`SpecError` naming ``--cases`` when none exists.
    """
    here = Path(__file__).resolve()
    roots = [*here.parents, *(start or Path.cwd()).resolve().parents, (start or Path.cwd()).resolve()]
    tried = []
    for root in roots:
        path = root / CASES_RELATIVE
        if path.is_file():
            return path
        tried.append(str(path))
    raise SpecError("--cases", "no public_cases.yaml found beside the repository (../shared/validation/); "
                    "pass --cases FILE")


def read_cases(path: Path) -> list[dict[str, Any]]:
    """The ``cases`` list of a cases file; one-line :class:`SpecError` (field ``--cases``) if unusable."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError("--cases", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError("--cases", f"{path} is not valid YAML{at}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise SpecError("--cases", f"{path} has no 'cases' list")
    cases = data["cases"]
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("id"), str) or "kind" not in case:
            raise SpecError(f"--cases.cases[{i}]", "each case needs an 'id' and a 'kind'")
    return cases


# --- small parsers ---------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    """An int from a YAML value that may be prose ('GPT-2 BPE 50257 (padded)' -> 50257)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.search(r"\d+", value)
        return int(m.group()) if m else None
    return None


def _completion(case_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prefix, values in COMPLETIONS.items():
        if case_id.startswith(prefix):
            out.update(values)
    return out


def gpt_spec(name: str, model: dict[str, Any], preset: str | None = None, mcore: bool = False) -> ModelSpec:
    """A Megatron GPT :class:`ModelSpec` from a case's ``model`` block (or a named preset).

    ``mcore``: a Megatron-Core run (RoPE, tied or untied embeddings by the stated ``params``)."""
    if preset:
        return resolve_model(preset)
    if mcore:
        spec = gpt_spec(name, model)
        spec = spec.model_copy(update=dict(positions="rope"))
        return _closer_embedding_tying(spec, model.get("params"))
    layers, hidden, heads = (_int(model.get(k)) for k in ("layers", "hidden", "heads"))
    if not (layers and hidden and heads):
        raise SpecError(f"{name}.model", "needs layers, hidden and heads")
    vocab = _int(model.get("vocab")) or 51200
    return ModelSpec(
        name=name, family="megatron-gpt", num_layers=layers, hidden=hidden, num_heads=heads,
        ffn=_int(model.get("ffn")) or 4 * hidden, vocab=vocab, max_seq=_int(model.get("seq_len")) or 2048,
        activation="gelu", norm="layernorm", positions="learned", tied_embeddings=True,
        qkv_bias=True, out_bias=True, mlp_bias=True, source=f"public_cases.yaml {name}",
    )


def _params_billion(text: Any) -> float | None:
    m = re.match(r"\s*([\d.]+)\s*B", str(text or ""))
    return float(m.group(1)) if m else None


def _closer_embedding_tying(spec: ModelSpec, params: Any) -> ModelSpec:
    """``spec`` with tied or untied embeddings, whichever total is closer to the stated size."""
    stated = _params_billion(params)
    if stated is None:
        return spec
    from tensorstage.model.params import param_counts

    options = [spec.model_copy(update=dict(tied_embeddings=t)) for t in (True, False)]
    return min(options, key=lambda s: abs(param_counts(s).total / 1e9 - stated))


def _overlap_flags(text: Any, tp: int) -> dict[str, Any]:
    """Plan settings named by a case's ``parallel.overlap`` text (Megatron flags)."""
    text = str(text or "")
    out: dict[str, Any] = {}
    if "--overlap-grad-reduce" in text:
        out["overlap_grad_reduce"] = True
    if "--overlap-param-gather" in text:
        out.update(zero=1, overlap_param_gather=True)
    if "--tp-comm-overlap" in text and tp > 1:
        out.update(tp_comm_overlap=True, sp=True)
    return out


def _dtype(precision: Any) -> str:
    text = str(precision or "fp16").lower()
    return "bf16" if text.startswith("bf16") else "fp16"


def _recompute(value: Any) -> tuple[str, bool]:
    """(recompute policy, sequence parallel) from a case's ``activation_recompute``/``mode`` text."""
    text = str(value or "none").lower()
    sp = "sequence" in text
    if text.startswith("full") or "full_recompute" in text:
        return "full", sp
    if "selective" in text:
        return "selective", sp
    return "none", sp


def is_megatron_core(case: dict[str, Any]) -> bool:
    """A run of Megatron-Core (its source or its id says so): Transformer Engine conventions apply."""
    ref = str((case.get("source") or {}).get("ref", "")).lower()
    return "megatron-core" in ref or "-MCORE-" in str(case.get("id", ""))


def system_for(gpu: Any) -> str:
    """System preset for a case's ``gpu`` text."""
    text = str(gpu or "").upper()
    if "H100" in text:
        return "dgx-h100-superpod"
    if "A100" in text:
        return "dgx-a100-selene"
    raise SpecError("hardware.gpu", f"no system preset for GPU {gpu!r}", allowed=("A100", "H100"))


def graph_options(dtype: str, case_id: str = "") -> GraphOptions:
    """Megatron-LM 2021-22 conventions at ``dtype`` (gradient dtype as the case's completion says)."""
    return GraphOptions(precision=dtype, grad_dtype=_completion(case_id).get("grad_dtype"), **MEGATRON_2021_OPTIONS)


def make_plan(par: dict[str, Any], num_gpus: int, seq: int, extra: dict[str, Any]) -> ParallelPlan:
    """A :class:`ParallelPlan` from a case's ``parallel`` block plus completions/overrides."""
    tp, pp = _int(extra.get("tp", par.get("tp"))) or 1, _int(extra.get("pp", par.get("pp"))) or 1
    dp = _int(par.get("dp")) or max(1, num_gpus // (tp * pp))
    mb = _int(par.get("micro_batch")) if isinstance(par.get("micro_batch"), int) else None
    recompute, sp = _recompute(par.get("activation_recompute") or par.get("mode"))
    sp = bool(par.get("sequence_parallel", sp))
    vpp = _int(par.get("interleaved_chunks_per_stage")) or 1
    data: dict[str, Any] = dict(tp=tp, pp=pp, dp=dp, seq=seq, recompute=recompute, sp=sp,
                                dtype=_dtype(par.get("precision")))
    gb = par.get("global_batch")
    if isinstance(gb, int):
        data["global_batch"] = gb
    data["micro_batch"] = mb or 1
    data["vpp"] = vpp
    for key in ("micro_batch", "global_batch", "vpp", "recompute", "sp", "schedule", "overlap_grad_reduce",
                "zero", "overlap_param_gather", "tp_comm_overlap", "dtype"):
        if key in extra:
            data[key] = extra[key]
    if data["vpp"] > 1:
        data["schedule"] = "interleaved"
    return ParallelPlan.parse(data, where="case.parallel")


# --- targets per case kind -------------------------------------------------------------------------


def _training_targets(case: dict[str, Any]) -> list[Target]:
    cid, kind = case["id"], case["kind"]
    extra = _completion(cid)
    model, par, hw = case.get("model") or {}, case.get("parallel") or {}, case.get("hardware") or {}
    measured = case.get("measured") or {}
    num_gpus = _int(hw.get("num_gpus")) or 1
    system = system_for(hw.get("gpu"))
    mcore = is_megatron_core(case)
    spec = gpt_spec(cid, model, extra.get("preset"), mcore=mcore)
    # Megatron-Core rows: bf16 unless the case says otherwise (the weak-scaling rows: "BF16 implied by
    # MFU vs 989 TFLOPs"; the strong-scaling rows, which state no precision, are the same table's
    # 177B model). The plan carries it too, so graph and plan agree (gradients: fp32 for bf16).
    text = str(par.get("precision", "")).lower()
    dtype = ("bf16" if "fp16" not in text.replace("bf16", "") else "fp16") if mcore else _dtype(par.get("precision"))
    opts = GraphOptions(precision=dtype, **MCORE_OPTIONS) if mcore else graph_options(dtype, cid)
    groups = (GROUP_TRAINING, GROUP_T5) if "-T5-" in cid else (GROUP_TRAINING,)
    if mcore:
        groups = (GROUP_TRAINING, GROUP_MCORE)
        tp = _int(extra.get("tp", par.get("tp"))) or 1
        flags = _overlap_flags(extra.get("overlap", par.get("overlap")), tp)
        # the plan's dtype is the one the graph is built in (lower.graph_options takes the plan's)
        extra = {**extra, **({"sp": True} if tp > 1 else {}), **flags, "dtype": dtype}
    groups = (*groups, split_group(cid))

    def setup(**over: Any) -> Setup:
        plan = make_plan(par, num_gpus, spec.max_seq, {**extra, **over})
        return Setup(spec, plan, opts, system, num_gpus)

    if mcore:
        if "tflops_per_gpu" in measured:
            return [Target(cid, cid, kind, "tflops_per_gpu", "TFLOP/s", float(measured["tflops_per_gpu"]),
                           "tflops_megatron", setup(), groups,
                           note="source convention: Megatron-Core r0.8 num_floating_point_operations "
                                "(no recompute, attention not halved) per step / (t * n)")]
        if "mfu_pct" in measured:
            return [Target(cid, cid, kind, "mfu_pct", "%", float(measured["mfu_pct"]), "mfu_pct_megatron",
                           setup(), groups,
                           note="source convention: Megatron-Core r0.8 FLOPs / (t * n * dense bf16 peak)")]
        return []

    if "iteration_time_s" in measured or "iteration_time_s_approx" in measured:
        value = measured.get("iteration_time_s", measured.get("iteration_time_s_approx"))
        return [Target(cid, cid, kind, "iteration_time_s", "s", float(value), "step_time_s", setup(), groups)]
    if "tflops_per_gpu" in measured:
        return [Target(cid, cid, kind, "tflops_per_gpu", "TFLOP/s", float(measured["tflops_per_gpu"]),
                       "tflops_narayanan_full_recompute", setup(), groups,
                       note="source convention: F_iter = 96BsLh^2(1+s/6h+V/16Lh) per step / (t * n)")]
    out = []
    for key, value in measured.items():
        m = re.fullmatch(r"mfu_pct_(.+)", key)
        if not m:
            continue
        recompute, sp = _recompute("selective_recompute+sequence_parallel" if "selective" in m.group(1)
                                   else "full")
        out.append(Target(f"{cid}:{m.group(1)}", cid, kind, "mfu_pct", "%", float(value), "mfu_pct_narayanan",
                          setup(recompute=recompute, sp=sp), groups,
                          note="source convention: model FLOPs 72BsLh^2(1+s/6h+V/12Lh), dense peak"))
    return out


def _layer_targets(case: dict[str, Any]) -> list[Target]:
    cid = case["id"]
    model, par = dict(case.get("model") or {}), case.get("parallel") or {}
    model["layers"] = 2  # the measured layer is layer 0 of a two-layer model (windows are per layer)
    tp = _int(par.get("tp")) or 1
    spec = gpt_spec(cid, model)
    plan = make_plan({**par, "pp": 1, "dp": 1, "global_batch": par.get("micro_batch")}, tp, spec.max_seq, {})
    setup = Setup(spec, plan, graph_options(plan.dtype, cid), "dgx-a100-selene", tp)
    out = []
    for key, value in (case.get("measured") or {}).items():
        if key.endswith("_ms"):
            out.append(Target(f"{cid}:{key[:-3]}", cid, case["kind"], key, "ms", float(value), f"layer_{key}",
                              setup, (GROUP_LAYER, split_group(cid)),
                              note="one transformer layer, TP comm included"))
    return out


def _fig1_setup(cid: str, model: dict[str, Any], par: dict[str, Any], mode: str) -> Setup:
    spec = gpt_spec(cid, model)
    tp, pp = _int(par.get("tp")) or 1, _int(par.get("pp")) or 1
    vpp = _int(par.get("interleave_v")) or 1
    mb = _int(par.get("micro_batch")) or 1
    p = {"tp": tp, "pp": pp, "dp": 1, "micro_batch": mb, "activation_recompute": mode,
         "global_batch": mb * pp * 4, "interleaved_chunks_per_stage": vpp}
    plan = make_plan(p, tp * pp, spec.max_seq, {})
    return Setup(spec, plan, graph_options(plan.dtype, cid), "dgx-a100-selene", tp * pp)


#: Fig. 1/7 measured keys -> (recompute mode text for the plan).
_MEM_MODES = {
    "activations_GiB_tp_only_no_recompute": "none",
    "activations_GiB_tp_sp_selective": "selective_recompute+sequence_parallel",
    "tp_only_pct": "none",
    "sequence_parallel_pct": "none+sequence",
    "selective_recompute_pct": "selective",
    "selective+sequence_pct": "selective_recompute+sequence_parallel",
    "full_recompute_pct": "full",
}


def _memory_targets(case: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[Target]:
    cid, kind = case["id"], case["kind"]
    measured = case.get("measured") or {}
    out: list[Target] = []
    if cid.startswith("MEM-ZERO"):
        spec = gpt_spec(cid, {}, _completion(cid).get("preset"))
        dp = _int((case.get("parallel") or {}).get("dp")) or 1
        # ZeRO's accounting (K = 12): 16-bit gradients, no fp32 gradient copy (a fused step)
        opts = GraphOptions(precision="fp16", grad_dtype="fp16", optimizer_impl="fused", **MEGATRON_2021_OPTIONS)
        for key, value in measured.items():
            stage = 0 if key.startswith("baseline") else int(key[len("zero")])
            plan = ParallelPlan.parse({"dp": dp, "zero": stage, "dtype": "fp16", "global_batch": dp,
                                       "seq": spec.max_seq}, where="case.parallel")
            out.append(Target(f"{cid}:{key}", cid, kind, key, "GB", float(value), "model_state_GB",
                              Setup(spec, plan, opts, "dgx-a100-selene", dp), (GROUP_MEMORY,),
                              note="mixed-precision Adam, 16-bit grads (ZeRO's K=12)"))
        return out
    if kind == "formula_memory":
        model, par = case.get("model") or {}, case.get("parallel") or {}
        for key, value in measured.items():
            if key == "params_grads_optimizer_GiB":
                setup, extract = _fig1_setup(cid, model, par, "none"), "layer_state_GiB"
            elif key in _MEM_MODES:
                setup, extract = _fig1_setup(cid, model, par, _MEM_MODES[key]), "activation_GiB"
            else:
                continue
            out.append(Target(f"{cid}:{key}", cid, kind, key, "GiB", float(value), extract, setup,
                              (GROUP_MEMORY,), note="transformer layers only, first pipeline stage"))
        return out
    if kind == "formula_memory_relative":
        size = cid.rsplit("-", 1)[-1]
        fig1 = by_id.get(f"MEM-KORTHIKANTI22-FIG1-{size}")
        if fig1 is None:
            return []
        model, par = fig1.get("model") or {}, fig1.get("parallel") or {}
        base = _fig1_setup(cid, model, par, "none")
        for key, value in measured.items():
            if key not in _MEM_MODES or key == "tp_only_pct":
                continue
            mode = _MEM_MODES[key]
            setup = _fig1_setup(cid, model, par, mode)
            out.append(Target(f"{cid}:{key}", cid, kind, key, "%", float(value), "activation_relative_pct",
                              setup, (GROUP_MEMORY,), args={"base": base},
                              note="activation memory relative to TP-only, no recompute"))
    return out


def select_ids(items: list[Any], only: str | None, id_of: Any, what: str = "case") -> list[Any]:
    """``items`` whose id (``id_of(item)``) matches the ``--only`` regular expression, ignoring case
    (ids are upper case; ``--only mlperf`` means them too; all if ``only`` is empty); a bad
    expression or no match is a one-line :class:`SpecError` naming ``--only``."""
    if not only:
        return items
    try:
        pattern = re.compile(only, re.IGNORECASE)
    except re.error as exc:
        raise SpecError("--only", f"not a regular expression: {exc}") from None
    picked = [x for x in items if pattern.search(str(id_of(x)))]
    if not picked:
        raise SpecError("--only", f"no {what} id matches {only!r}")
    return picked


def load_targets(path: Path) -> tuple[list[Target], list[tuple[str, str]]]:
    """Targets of every case we can predict, and ``(case id, reason)`` for those we skip."""
    cases = read_cases(path)
    by_id = {c["id"]: c for c in cases}
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    for case in cases:
        kind = str(case["kind"])
        try:
            if kind in ("training_step_time", "training_throughput"):
                found = _training_targets(case)
            elif kind == "layer_time":
                found = _layer_targets(case)
            elif kind.startswith("formula_memory"):
                found = _memory_targets(case, by_id)
            else:
                skipped.append((case["id"], f"kind {kind} is not predicted"))
                continue
        except SpecError as exc:
            skipped.append((case["id"], str(exc)))
            continue
        if not found:
            skipped.append((case["id"], "no measured number this tool predicts"))
        targets += found
    return targets, skipped
