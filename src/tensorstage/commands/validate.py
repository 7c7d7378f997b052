"""``tensorstage validate``: predict every published case of the validation file and report errors.

Why a command: accuracy claims should be reproducible by anyone with the repository; this runs
the same lowering and simulator a user's ``simulate`` does on each published configuration and
prints predicted vs measured, the error per case and the MAPE per group (Korthikanti Table 5
step times, all training cases, per-layer times, memory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from tensorstage import api
from tensorstage.fileio import read_text_file
from tensorstage.report.console import print_json, print_table
from tensorstage.validation.cases import GROUP_TRAINING


def _validate(cases: Path | None, only: str | None, json_out: bool) -> None:
    if cases is not None and cases.is_file():
        read_text_file(cases, "cases file")  # a binary or huge file: one line, not a traceback
    started = time.monotonic()

    def progress(i: int, n: int, t: object) -> None:  # on stderr, so --json and piped tables stay clean
        if sys.stderr.isatty():
            print(f"\r[{i}/{n}] {time.monotonic() - started:.0f} s  {getattr(t, 'id', '')}"[:100]
                  .ljust(100), end="", file=sys.stderr, flush=True)

    run = api.validate(cases, only, progress)
    if sys.stderr.isatty():
        print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)
    doc = run.doc
    if json_out:
        print_json(doc)
        if run.failed:  # a case the tool could not predict is a bug, not an accuracy number
            raise typer.Exit(1)
        return
    rows = [
        [r.id, r.metric, r.predicted, r.measured, r.error_pct, r.error or ""]
        for r in run.results
    ]
    print_table(f"Validation against {run.cases_path.name}",
                ["case", "metric", "predicted", "measured", "error %", "note"], rows)
    grows = [[g, s["n"], s["failed"], s["mape_pct"], s["max_abs_error_pct"]] for g, s in doc["groups"].items()]
    print_table("MAPE by group", ["group", "cases", "failed", "MAPE %", "max |error| %"], grows)
    for case_id, why in run.skipped:
        print(f"skipped {case_id}: {why}")
    mape = doc["mape_pct"]
    print(f"overall MAPE ({GROUP_TRAINING} cases): " + ("n/a" if mape is None else f"{mape:.2f} %"))
    if run.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``validate`` to the CLI."""

    @app.command("validate")
    def validate_cmd(
        cases: Path = typer.Option(None, "--cases", help="Cases YAML (default: ../shared/validation/"
                                   "public_cases.yaml beside the repository)."),
        only: str = typer.Option(None, "--only", help="Regular expression: run only case ids matching it."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        serving: bool = typer.Option(False, "--serving", help="Validate the serving simulator on "
                                     "public_serving_cases.yaml instead (MAPE per kind)."),
    ) -> None:
        """Simulate every published case and compare with the measured numbers (MAPE per group)."""
        if serving:
            from tensorstage.commands.validate_serving import validate_serving

            validate_serving(cases, only, json_out)
            return
        _validate(cases, only, json_out)
