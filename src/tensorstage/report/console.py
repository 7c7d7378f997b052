"""Console output shared by all commands: rich tables for people, stable JSON for programs."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from rich.console import Console
from rich.table import Table


class _Console(Console):
    """rich's console, leaving like a Unix tool when its reader closes the pipe (``| head``): exit
    status 128 + SIGPIPE (141), as coreutils report it, instead of rich's 1 (which reads as an error)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        leave_on_broken_pipe()


def leave_on_broken_pipe() -> None:
    """The reader of stdout is gone: point stdout at /dev/null (nothing left to flush at exit) and
    leave with 128 + SIGPIPE, as a Unix tool killed by SIGPIPE reports."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(128 + signal.SIGPIPE)


# Piped output (CI logs, `| less`) would be cut at rich's 80-column default; tables are wide.
console = _Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout (insertion order kept, so output is deterministic)."""
    try:
        sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        leave_on_broken_pipe()


def _default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table; numeric columns are right-aligned."""
    table = Table(title=title, show_lines=False)
    for i, col in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], int | float) for r in rows)
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # one rule everywhere: 4 significant digits, but never scientific notation for values a
        # reader compares by eye (123,528 tokens/s, not 1.235e+05)
        if math.isfinite(value) and 1e4 <= abs(value) < 1e15:
            return f"{value:,.0f}"
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def human_count(n: float) -> str:
    """1.23B / 456.7M style count for parameter totals."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def status(message: str) -> AbstractContextManager[object]:
    """A spinner with ``message`` on stderr while a long step runs (lowering and simulating a big
    plan takes seconds), only on a terminal: piped and JSON output stay byte-identical."""
    if not sys.stderr.isatty():
        return nullcontext()
    return Console(stderr=True).status(message)
