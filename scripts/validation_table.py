"""Markdown table of a ``tensorstage validate --json`` document (for docs/calibration.md).

Usage: ``tensorstage validate --json > v.json; python scripts/validation_table.py v.json``.
The per-case table in the docs is produced by this script from the tool's own output, never typed.
"""

from __future__ import annotations

import json
import sys


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def main(path: str) -> None:
    from pathlib import Path

    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    print("| case | metric | predicted | measured | error % | groups |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for c in doc["cases"]:
        if "memory" in c["groups"]:
            continue
        err = "-" if c["error_pct"] is None else f"{c['error_pct']:+.1f}"
        groups = ", ".join(g for g in c["groups"] if g not in ("training",))
        print(f"| {c['id']} | {c['metric']} | {_num(c['predicted'])} | {_num(c['measured'])} | {err} | {groups} |")
    print()
    print("| group | cases | MAPE % | max abs error % |")
    print("| --- | ---: | ---: | ---: |")
    for g, v in doc["groups"].items():
        print(f"| {g} | {v['n']} | {_num(v['mape_pct'])} | {_num(v['max_abs_error_pct'])} |")


if __name__ == "__main__":
    main(sys.argv[1])
