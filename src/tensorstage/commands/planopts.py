"""The plan flags shared by every command that takes a parallel plan (``generate``, ``simulate``, ...).

Typer declares options per command function, so sharing is done by a decorator that appends the
plan flags to a command's signature and hands the command a checked :class:`ParallelPlan`::

    from tensorstage.commands.planopts import with_plan_options

    @app.command()
    @with_plan_options
    def generate(model: str, plan: ParallelPlan, out: Path = typer.Option(...)) -> None:
        ...

The command must have a parameter named ``plan``; the decorator removes it from the CLI, adds
``-c/--config`` and one option per plan flag, and passes ``plan=`` built by
:func:`tensorstage.api.choose_plan`: explicit flag > value in the ``-c`` YAML > default plan, where
the default plan is :data:`tensorstage.api.DEFAULT_PLAN` (the same for every command) and a ``-c``
file replaces it. Every flag's default is ``None`` ("not given"), which is how an explicit flag is
told apart from a default. Notes about derived changes (a kept default that changes the GPU
count, ...) go to stderr as ``note: ...`` lines when the command succeeds (an error stays one
line); a command with a ``plan_choice`` parameter also gets the :class:`tensorstage.api.PlanChoice`
(notes for its JSON, which keys were given).

The flags and the YAML keys are the same names (``--global-batch`` <-> ``global_batch``).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from tensorstage.errors import SpecError
from tensorstage.parallel.plan import ParallelPlan, load_plan, split_rank_order

F = TypeVar("F", bound=Callable[..., Any])

PANEL = "Parallel plan"

# (parameter name, python type, flag declarations, help). Parameter names are plan keys.
PLAN_FLAGS: tuple[tuple[str, type, tuple[str, ...], str], ...] = (
    ("tp", int, ("--tp",), "Tensor-parallel degree."),
    ("pp", int, ("--pp",), "Pipeline-parallel degree (stages)."),
    ("dp", int, ("--dp",), "Data-parallel degree."),
    ("cp", int, ("--cp",), "Context-parallel degree."),
    ("ep", int, ("--ep",), "Expert-parallel degree (divides dp*cp; with --etp 1 divides tp*dp*cp)."),
    ("etp", int, ("--etp",), "Expert tensor-parallel degree: tp (default) or 1 (MoE parallel folding: "
     "experts whole, EP over tp*dp*cp)."),
    ("vpp", int, ("--vpp",), "Virtual pipeline stages per PP rank (interleaved)."),
    ("sp", bool, ("--sp/--no-sp",), "Sequence parallelism over the TP group."),
    ("zero", int, ("--zero",), "ZeRO stage: 0, 1, 2, 3 (3 = FSDP)."),
    ("schedule", str, ("--schedule",), "Pipeline schedule: gpipe, 1f1b, interleaved, zb-h1."),
    ("recompute", str, ("--recompute",), "Activation recompute: none, selective, full."),
    ("seq", int, ("--seq",), "Sequence length (tokens)."),
    ("global_batch", int, ("--global-batch",), "Sequences per step (all DP ranks)."),
    ("micro_batch", int, ("--micro-batch",), "Sequences per micro-batch per DP rank."),
    ("recompute_modules", str, ("--recompute-modules",),
     "With --recompute selective: submodules to re-run, e.g. moe_act,layernorm (Megatron-Core "
     "--recompute-modules: core_attn, moe_act, layernorm, mla_up_proj, mlp, moe, shared_experts)."),
    ("dtype", str, ("--dtype",), "Compute dtype: bf16, fp16, fp8, fp32."),
    ("rank_order", str, ("--rank-order",), "Axes innermost first, e.g. tp,cp,dp,pp (or tp-cp-ep-dp-pp)."),
    ("phase", str, ("--phase",), "Phase: train, prefill, decode."),
    ("context", int, ("--context",), "KV length for decode (default: seq)."),
    ("cp_mode", str, ("--cp-mode",), "Context parallelism: ring, allgather."),
    ("pp_layer_split", str, ("--pp-layer-split",), "Layers per pipeline stage, e.g. 7,8,8,...,7 (uneven)."),
    ("zero_shard_size", int, ("--zero-shard-size",), "Hybrid sharding: shard within groups of this many."),
    ("dp_bucket_bytes", int, ("--dp-bucket-bytes",), "Gradient bucket size in bytes (default: per ddp-style)."),
    ("ddp_style", str, ("--ddp-style",), "Data-parallel conventions: megatron, torch."),
    ("fsdp_reshard_after_forward", str, ("--fsdp-reshard-after-forward",),
     "ZeRO-3/FSDP2 reshard after forward: default (torch: layers yes, root no), true, false."),
    ("overlap_param_gather", bool, ("--overlap-param-gather/--no-overlap-param-gather",),
     "ZeRO-1/2: overlap the updated-parameter all-gather with the next forward (Megatron)."),
    ("overlap_grad_reduce", bool, ("--overlap-grad-reduce/--no-overlap-grad-reduce",),
     "Reduce gradients in buckets during backward (Megatron --overlap-grad-reduce; default on)."),
    ("tp_comm_overlap", bool, ("--tp-comm-overlap/--no-tp-comm-overlap",),
     "Pipeline SP all-gather / reduce-scatter with their GEMMs (Megatron --tp-comm-overlap; needs sp)."),
    ("moe_dispatch_fp8", bool, ("--moe-dispatch-fp8/--no-moe-dispatch-fp8",),
     "EP all-to-alls toward the experts in FP8 (DeepSeek-V3; needs --dtype fp8 and ep > 1)."),
    ("moe_a2a_overlap", bool, ("--moe-a2a-overlap/--no-moe-a2a-overlap",),
     "Overlap each micro-batch's backward with the next forward to hide the EP all-to-alls (Megatron "
     "--overlap-moe-expert-parallel-comm, combined 1F1B; needs ep > 1 and pp 1)."),
    ("capacity_factor", float, ("--capacity-factor",), "MoE capacity factor (default: dropless)."),
    ("routing_skew", float, ("--routing-skew",), "MoE load at the busiest expert rank / mean (>= 1)."),
    ("attention_impl", str, ("--attention-impl",),
     "Attention kernel: flash (fused, default)|materialized (eager softmax, saves probabilities)."),
    ("attention_flops", str, ("--attention-flops",),
     "Attention FLOP convention: causal_half (default, Megatron-Core)|full (no causal halving)."),
    ("dropout", bool, ("--dropout/--no-dropout",), "Model dropout layers (default off)."),
    ("megatron_fusions", bool, ("--megatron-fusions/--no-megatron-fusions",),
     "Megatron-LM fused element-wise kernels: bias-dropout-add, bias-GeLU (default off)."),
)
PLAN_FLAG_NAMES = tuple(name for name, *_ in PLAN_FLAGS)
CONFIG_PARAM = "plan_config"


def plan_from_options(config: Path | None = None, **flags: Any) -> ParallelPlan:
    """A checked plan from ``-c`` YAML (optional) and flag values over :class:`ParallelPlan`'s own
    field defaults (not the commands' default plan: see :func:`tensorstage.api.choose_plan`);
    ``None`` flags are "not given". ``rank_order`` may be a comma-separated string as typed.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(given.get("rank_order"), str):
        given["rank_order"] = split_rank_order(given["rank_order"])
    if isinstance(given.get("pp_layer_split"), str):
        given["pp_layer_split"] = _int_list(given["pp_layer_split"], "pp_layer_split")
    if config is not None:
        return load_plan(config, given)
    return ParallelPlan.parse(given, where="plan")


def _int_list(text: str, field: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise SpecError(field, f"expected comma-separated integers, got {text!r}") from None


def plan_parameters() -> list[inspect.Parameter]:
    """The ``-c/--config`` option and one keyword-only typer option per plan flag (default None)."""
    params = [
        inspect.Parameter(
            CONFIG_PARAM,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "-c",
                "--config",
                help="Plan YAML (keys = flag names); flags override it.",
                rich_help_panel=PANEL,
            ),
            annotation=Path | None,
        )
    ]
    from tensorstage.api import DEFAULT_PLAN

    for name, typ, decls, help_ in PLAN_FLAGS:
        default = getattr(DEFAULT_PLAN, name)
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, tuple):
            default = ",".join(map(str, default))
        if default is not None:
            help_ = f"{help_} Default plan: {default}."
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_, rich_help_panel=PANEL),
                annotation=typ | None,
            )
        )
    return params


def with_plan_options(func: F) -> F:
    """Decorate a typer command that takes ``plan: ParallelPlan``: the CLI gets the plan flags and
    ``-c/--config``; the command gets the resulting checked plan (bad input raises ``SpecError``)."""
    sig = inspect.signature(func, eval_str=True)
    if "plan" not in sig.parameters:
        raise TypeError(f"{func.__name__} needs a 'plan' parameter to use with_plan_options")
    clash = {CONFIG_PARAM, *PLAN_FLAG_NAMES} & set(sig.parameters)
    if clash:
        raise TypeError(f"{func.__name__} already has parameters {sorted(clash)}")
    own = [p for p in sig.parameters.values() if p.name != "plan"]
    positional = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in positional]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tensorstage.api import choose_plan

        config = kwargs.pop(CONFIG_PARAM, None)
        flags = {k: kwargs.pop(k) for k in PLAN_FLAG_NAMES if k in kwargs}
        choice = choose_plan(config, **flags)
        if wants_choice:
            kwargs["plan_choice"] = choice
        result = func(*args, plan=choice.plan, **kwargs)
        for note in choice.notes:  # after the work: a bad-input error stays one line
            print(f"note: {note}", file=sys.stderr)
        return result

    wants_choice = "plan_choice" in sig.parameters
    positional = [p for p in positional if p.name != "plan_choice"]
    keyword = [p for p in keyword if p.name != "plan_choice"]
    new_params = positional + keyword + plan_parameters()
    wrapper.__signature__ = sig.replace(parameters=new_params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in new_params}
    del wrapper.__wrapped__  # typer must see the new signature, not the original
    return wrapper  # type: ignore[return-value]
