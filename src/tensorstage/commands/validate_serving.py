"""``tensorstage validate --serving``: the serving simulator against published serving results.

Printing only; the cases, the mapping to simulations and the MAPE per kind are
:mod:`tensorstage.validation.serving`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tensorstage.report.console import print_json, print_table
from tensorstage.validation.serving import default_serving_cases_path, run_serving_validation, serving_report


def _verdict(meets: bool | None) -> str:
    return "-" if meets is None else ("meets" if meets else "misses")


def validate_serving(cases: Path | None, only: str | None, json_out: bool) -> None:
    """Run every serving case (or those matching ``only``) and print points and MAPE per kind."""
    path = cases if cases is not None else default_serving_cases_path()

    def progress(case_id: str) -> None:
        if not json_out and sys.stderr.isatty():
            print(f"  {case_id} ...", file=sys.stderr)

    points, skipped = run_serving_validation(path, only, progress)
    doc = serving_report(points, skipped)
    failed = any(p.predicted is None for p in points)
    if json_out:
        print_json(doc)
    else:
        rows = [[p["case"], p["point"], p["predicted"], p["measured"], p["error_pct"], p["note"]] for p in doc["points"]]
        print_table(f"Serving validation against {path.name}",
                    ["case", "point", "predicted", "measured", "error %", "note"], rows)
        krows = [[k, v["n"], v["failed"], v["mape_pct"], v["max_abs_error_pct"]] for k, v in doc["kinds"].items()]
        print_table("MAPE by kind", ["kind", "points", "failed", "MAPE %", "max |error| %"], krows)
        srows = [[p["case"], p["point"], p["limit"], _verdict(p["measured_meets_limit"]),
                  _verdict(p["predicted_meets_limit"]),
                  "yes" if p["measured_meets_limit"] == p["predicted_meets_limit"] else "NO"]
                 for p in doc["points"] if "limit" in p]
        if srows:
            print_table("SLO verdicts (p99 against the limit)",
                        ["case", "point", "limit", "measured", "predicted", "agree"], srows)
        for s in doc["skipped"]:
            print(f"skipped {s['case']}: {s['reason']}")
    if failed:
        raise typer.Exit(1)
