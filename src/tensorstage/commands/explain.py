"""``tensorstage explain MODEL``: parameters, FLOPs, activation and KV-cache bytes, and their formulas.

Why: people want to see *why* a model costs what it costs. Every number comes from the one
symbolic graph (:mod:`tensorstage.graph`), and the closed-form expressions printed are the same
sympy expressions the numbers were evaluated from, per layer kind, with the model's dimensions
substituted so only the run's free symbols remain (``b`` micro-batch, ``s`` sequence, ``c`` context).
"""

from __future__ import annotations

from typing import Any

import sympy as sp
import typer

from tensorstage.api import DEFAULT_PLAN
from tensorstage.errors import SpecError
from tensorstage.graph import SYMBOLS, Graph, GraphOptions, build_graph
from tensorstage.graph.options import (
    ATTENTION_FLOPS,
    ATTENTION_IMPLS,
    OPTIMIZERS,
    PHASES,
    PRECISIONS,
    RECOMPUTE,
)
from tensorstage.report.console import human_count, print_json, print_table

RUN_SYMBOLS = ("b", "s", "c")
FORMULA_METRICS = (
    "fwd_flops",
    "bwd_input_flops",
    "bwd_weight_flops",
    "recompute_flops",
    "activation_bytes",
    "params",
    "kv_cache_bytes_per_token",
)


def _resolve(model: str) -> Any:
    try:
        from tensorstage.model import resolve_model
    except ImportError as exc:  # pragma: no cover - only before the model package provides it
        raise SpecError("model", f"model lookup is not available ({exc})") from None
    return resolve_model(model)


def _bindings(seq: int, batch: int, context: int) -> dict[str, int]:
    return {"b": batch, "s": seq, "c": context}


def _model_substituted(graph: Graph, expr: sp.Expr) -> sp.Expr:
    """``expr`` with the model's dimensions replaced by numbers, leaving b, s, c symbolic."""
    subs = {SYMBOLS[k]: sp.nsimplify(v) for k, v in graph.bindings.items() if k not in RUN_SYMBOLS}
    return sp.expand(sp.sympify(expr).xreplace(subs))


def formulas(graph: Graph) -> dict[str, dict[str, dict[str, str]]]:
    """Per block kind and metric: the symbolic formula and the one with the model's sizes substituted."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, blk in graph.blocks().items():
        exprs = graph.block_exprs(blk)
        out[name] = {}
        for metric in FORMULA_METRICS:
            expr = exprs[metric]
            if expr == 0:
                continue
            out[name][metric] = {
                "symbolic": str(sp.factor(expr)),
                "model": str(_model_substituted(graph, expr)),
            }
    return out


def _per_token_flops(spec: Any, opts: GraphOptions, seq: int, batch: int, context: int) -> dict[str, float]:
    res: dict[str, float] = {}
    for phase in PHASES:
        g = build_graph(spec, phase, opts)
        rep = g.costs(_bindings(seq, batch, context), exact=True)
        tokens = batch * (1 if phase == "decode" else seq)
        res[phase] = float(rep.total_flops()) / tokens
    return res


def explain_data(
    model: str, phase: str, seq: int, batch: int, context: int, opts: GraphOptions
) -> dict[str, Any]:
    """Everything ``explain`` shows, as a JSON-ready dict."""
    spec = _resolve(model)
    graph = build_graph(spec, phase, opts)
    rep = graph.costs(_bindings(seq, batch, context), exact=True)
    kv_graph = graph if phase != "train" else build_graph(spec, "decode", opts)
    blocks = {
        name: {"count": rep.counts[name], **{m: float(v) for m, v in rep.per_block[name].items()}}
        for name in graph.blocks()
    }
    return {
        "model": spec.name,
        "phase": phase,
        "bindings": {"b": batch, "s": seq, "c": context},
        "options": {k: v for k, v in opts.__dict__.items() if k != "phase"},
        "params": graph.param_count(),
        "layer_kinds": {k: graph.layer_kinds.count(k) for k in graph.layers},
        "blocks": blocks,
        # KV bytes per token are reported once, below, from a decode graph (a train graph has none)
        "totals": {m: float(v) for m, v in rep.totals.items() if m != "kv_cache_bytes_per_token"},
        "total_flops": float(rep.total_flops()),
        "flops_per_token": _per_token_flops(spec, opts, seq, batch, context),
        "kv_cache_bytes_per_token": kv_graph.kv_cache_bytes_per_token(),
        "formulas": formulas(graph),
    }


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _print(data: dict[str, Any]) -> None:
    b = data["bindings"]
    hc = human_count
    print_table(
        f"{data['model']}: {data['phase']} (b={b['b']}, s={b['s']}, c={b['c']}), "
        f"{human_count(data['params'])} parameters",
        [
            "block",
            "count",
            "params",
            "fwd FLOPs",
            "bwd input FLOPs",
            "bwd weight FLOPs",
            "recompute FLOPs",
            "activation bytes",
        ],
        [
            [
                name,
                blk["count"],
                hc(blk["params"]),
                hc(blk["fwd_flops"]),
                hc(blk["bwd_input_flops"]),
                hc(blk["bwd_weight_flops"]),
                hc(blk["recompute_flops"]),
                _bytes(blk["activation_bytes"]),
            ]
            for name, blk in data["blocks"].items()
        ],
    )
    t = data["totals"]
    print_table(
        "Totals",
        ["quantity", "value"],
        [
            ["matmul FLOPs (all categories)", hc(data["total_flops"])],
            ["vector FLOPs (fwd)", hc(t["fwd_vector_flops"])],
            ["activation bytes (all layers)", _bytes(t["activation_bytes"])],
            ["optimizer-step bytes moved", _bytes(t["optimizer_bytes"])],
            ["KV-cache bytes per token", str(data["kv_cache_bytes_per_token"])],
            *[[f"FLOPs per token, {p}", hc(v)] for p, v in data["flops_per_token"].items()],
        ],
    )
    rows = [
        [blk, metric, f["symbolic"], f["model"]]
        for blk, fs in data["formulas"].items()
        for metric, f in fs.items()
    ]
    print_table("Closed forms (per block instance)", ["block", "metric", "formula", "with model sizes"], rows)


def register(app: typer.Typer) -> None:
    """Add the ``explain`` command."""

    @app.command("explain")
    def explain(
        model: str = typer.Argument(..., help="Preset name, HF config.json or model YAML."),
        seq: int = typer.Option(DEFAULT_PLAN.seq, "--seq", help="Sequence length s (prefill / train); "
                                "default: the default plan's."),
        batch: int = typer.Option(DEFAULT_PLAN.micro_batch, "--batch", "--micro-batch",
                                  help="Micro-batch b (sequences); --micro-batch as in the plan flags; "
                                       "default: the default plan's."),
        phase: str = typer.Option("train", "--phase", help=f"One of {', '.join(PHASES)}."),
        context: int = typer.Option(4096, "--context", help="KV context length c for decode."),
        recompute: str = typer.Option(DEFAULT_PLAN.recompute, "--recompute",
                                      help=f"One of {', '.join(RECOMPUTE)}; default: the default plan's."),
        attention: str = typer.Option("flash", "--attention-impl", "--attention",
                                      help=f"One of {', '.join(ATTENTION_IMPLS)}."),
        attention_flops: str = typer.Option(
            "causal_half", "--attention-flops", help=f"One of {', '.join(ATTENTION_FLOPS)}."
        ),
        dtype: str = typer.Option(DEFAULT_PLAN.dtype, "--dtype", help=f"Precision policy: {', '.join(PRECISIONS)}."),
        optimizer: str = typer.Option("adamw", "--optimizer", help=f"One of {', '.join(OPTIMIZERS)}."),
        dropout: bool = typer.Option(False, "--dropout/--no-dropout", help="Model dropout layers."),
        megatron_fusions: bool = typer.Option(
            False, "--megatron-fusions/--no-megatron-fusions",
            help="Megatron-LM fused element-wise kernels (applied when a plan is lowered).",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Parameters, FLOPs per token, activation and KV-cache bytes, and the formulas behind them."""
        for field, val in (("seq", seq), ("batch", batch), ("context", context)):
            if val < 1:
                raise SpecError(field, "must be >= 1")
        opts = GraphOptions(
            phase=phase,
            recompute=recompute,
            attention_impl=attention,
            attention_flops=attention_flops,
            precision=dtype,
            optimizer=optimizer,
            dropout=dropout,
            megatron_fusions=megatron_fusions,
        )
        opts.validate()
        data = explain_data(model, phase, seq, batch, context, opts)
        if json_out:
            print_json(data)
        else:
            _print(data)
