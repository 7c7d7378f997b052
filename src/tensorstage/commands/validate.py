"""``tensorstage validate``: predict every published case of the validation file and report errors.

Why a command: accuracy claims should be reproducible by anyone with the repository; this runs
the same lowering and simulator a user's ``simulate`` does on each published configuration and
prints predicted vs measured, the error per case and the MAPE per group (Korthikanti Table 5
step times, all training cases, per-layer times, memory).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import typer

from tensorstage.errors import SpecError
from tensorstage.fileio import read_text_file
from tensorstage.report.console import print_json, print_table
from tensorstage.validation.cases import GROUP_TRAINING, default_cases_path, load_targets
from tensorstage.validation.run import report, run_targets


def _validate(cases: Path | None, only: str | None, json_out: bool) -> None:
    path = cases if cases is not None else default_cases_path()
    if cases is not None and cases.is_file():
        read_text_file(cases, "cases file")  # a binary or huge file: one line, not a traceback
    targets, skipped = load_targets(path)
    if only:
        try:
            pattern = re.compile(only)
        except re.error as exc:
            raise SpecError("--only", f"not a regular expression: {exc}") from None
        targets = [t for t in targets if pattern.search(t.id)]
        if not targets:
            raise SpecError("--only", f"no case id matches {only!r}")

    done = [0]
    started = time.monotonic()

    def progress(t: object) -> None:  # on stderr, so --json and piped tables stay clean
        done[0] += 1
        if sys.stderr.isatty():
            print(f"\r[{done[0]}/{len(targets)}] {time.monotonic() - started:.0f} s  {getattr(t, 'id', '')}"[:100]
                  .ljust(100), end="", file=sys.stderr, flush=True)

    results = run_targets(targets, progress)
    if sys.stderr.isatty():
        print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)
    doc = report(results, skipped)
    failed = any(r.predicted is None for r in results)
    if json_out:
        print_json(doc)
        if failed:  # a case the tool could not predict is a bug, not an accuracy number
            raise typer.Exit(1)
        return
    rows = [
        [r.id, r.metric, r.predicted, r.measured, r.error_pct, r.error or ""]
        for r in results
    ]
    print_table(f"Validation against {path.name}", ["case", "metric", "predicted", "measured", "error %", "note"],
                rows)
    grows = [[g, s["n"], s["failed"], s["mape_pct"], s["max_abs_error_pct"]] for g, s in doc["groups"].items()]
    print_table("MAPE by group", ["group", "cases", "failed", "MAPE %", "max |error| %"], grows)
    for case_id, why in skipped:
        print(f"skipped {case_id}: {why}")
    mape = doc["mape_pct"]
    print(f"overall MAPE ({GROUP_TRAINING} cases): " + ("n/a" if mape is None else f"{mape:.2f} %"))
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``validate`` to the CLI."""

    @app.command("validate")
    def validate_cmd(
        cases: Path = typer.Option(None, "--cases", help="Cases YAML (default: ../shared/validation/"
                                   "public_cases.yaml beside the repository)."),
        only: str = typer.Option(None, "--only", help="Regular expression: run only case ids matching it."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """Simulate every published case and compare with the measured numbers (MAPE per group)."""
        _validate(cases, only, json_out)
