"""``tensorstage models`` and ``tensorstage show``: browse model presets and inspect any model.

Why a command: before planning a run, people want the dimensions and parameter totals of the
model they named (preset, HF ``config.json`` or YAML file) without writing code.
"""

from __future__ import annotations

from typing import Any

import typer

from tensorstage.model import ModelSpec, get_preset, list_presets, param_counts, resolve_model
from tensorstage.model.params import ParamCounts
from tensorstage.report.console import human_count, print_json, print_table


def _heads(spec: ModelSpec) -> str:
    return f"{spec.num_heads}/{spec.kv_heads}" if spec.mla is None else f"{spec.num_heads} (MLA)"


def _experts(spec: ModelSpec) -> str:
    if spec.moe is None:
        return "-"
    shared = f"+{spec.moe.shared_experts}s" if spec.moe.shared_experts else ""
    return f"{spec.moe.num_experts}{shared}/{spec.moe.top_k}"


def summary_row(spec: ModelSpec, counts: ParamCounts) -> dict[str, Any]:
    """One preset as the flat record both the table and ``--json`` show."""
    return {
        "name": spec.name,
        "family": spec.family,
        "layers": spec.num_layers,
        "hidden": spec.hidden,
        "heads": spec.num_heads,
        "kv_heads": spec.kv_heads,
        "ffn": spec.ffn,
        "vocab": spec.vocab,
        "experts": spec.moe.num_experts if spec.moe else None,
        "top_k": spec.moe.top_k if spec.moe else None,
        "total_params": counts.total,
        "active_params": counts.active,
    }


def _models(json_out: bool) -> None:
    specs = [get_preset(name) for name in list_presets()]
    records = [summary_row(s, param_counts(s)) for s in specs]
    if json_out:
        print_json(records)
        return
    rows = [
        [
            s.name,
            s.family,
            s.num_layers,
            s.hidden,
            _heads(s),
            s.ffn,
            s.vocab,
            _experts(s),
            human_count(r["total_params"]),
            human_count(r["active_params"]),
        ]
        for s, r in zip(specs, records, strict=True)
    ]
    columns = [
        "name",
        "family",
        "layers",
        "hidden",
        "heads/kv",
        "ffn",
        "vocab",
        "experts/top-k",
        "total",
        "active",
    ]
    print_table("Model presets", columns, rows)


def _show(model: str, json_out: bool, yaml_out: bool = False) -> None:
    spec = resolve_model(model)
    if yaml_out:  # a starting template: the file loads back as the same model (docs/formats.md)
        import yaml

        data = spec.model_dump(mode="json", exclude_defaults=True)
        print(yaml.safe_dump({"name": spec.name, **data}, sort_keys=False, allow_unicode=True, width=110), end="")
        return
    counts = param_counts(spec)
    if json_out:
        print_json({"model": spec.model_dump(mode="json"), "params": counts.as_dict()})
        return
    fields = spec.model_dump(mode="json")
    rows: list[list[Any]] = []
    for key, value in fields.items():
        if isinstance(value, dict):
            rows.extend([f"{key}.{k}", _plain(v)] for k, v in value.items())
        else:
            rows.append([key, _plain(value)])
    if spec.mla is None:  # MLA has per-head q/k/v widths of its own, listed above
        rows += [["head_dim (derived)", str(spec.dim_head)], ["kv_heads (derived)", str(spec.kv_heads)]]
    print_table(f"Model {spec.name}", ["field", "value"], rows)
    print_table(f"Parameters of {spec.name}", ["part", "params", "human"], _param_rows(counts))


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "-"
    return "-" if value is None else str(value)


def _param_rows(c: ParamCounts) -> list[list[Any]]:
    parts = [
        ("embedding (tokens + positions)", c.embedding),
        ("lm head (0 = tied)", c.lm_head),
        ("attention (all layers)", c.attention),
        ("dense MLP (all layers)", c.mlp),
        ("router", c.router),
        ("routed experts", c.routed_experts),
        ("shared experts", c.shared_experts),
        ("norms (incl. final)", c.norms),
        (f"layers: {c.num_dense_layers} dense + {c.num_moe_layers} MoE", None),
        ("total", c.total),
        ("active per token", c.active),
        ("non-embedding", c.non_embedding),
    ]
    return [[name, "" if n is None else n, "" if n is None else human_count(n)] for name, n in parts]


def register(app: typer.Typer) -> None:
    """Add ``models`` and ``show`` to the CLI."""

    @app.command("models")
    def models_cmd(
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List the built-in model presets with their dimensions and parameter counts."""
        _models(json_out)

    @app.command("show")
    def show_cmd(
        model: str = typer.Argument(..., help="Preset name, HF config.json path, or model YAML path."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        yaml_out: bool = typer.Option(False, "--yaml", help="Print the model as a model YAML (a template to edit)."),
    ) -> None:
        """Show every field of a model and its parameter breakdown."""
        _show(model, json_out, yaml_out)
