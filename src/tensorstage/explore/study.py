"""The study store: every trial in one SQLite table, written as each finishes, and the Pareto front.

Why SQLite: it ships with Python (sqlite3), a committed row survives Ctrl-C, a crash or a killed
process (the write-ahead log makes each commit atomic), and a resumed run reads back exactly what
finished. A trial's number is its position in the agent's ask order, so the table is the same
whatever order parallel workers finish in.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorstage.errors import SpecError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    number INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    metrics TEXT NOT NULL,
    objectives TEXT,
    message TEXT NOT NULL,
    wall_s REAL NOT NULL
);
"""


@dataclass
class Trial:
    """One evaluated (or rejected) configuration."""

    number: int
    key: str
    params: dict[str, Any]
    status: str
    source: str  # full | fast | constraint | cache
    metrics: dict[str, float] = field(default_factory=dict)
    objectives: list[float] | None = None  # as reported (maximised ones not negated)
    message: str = ""
    wall_s: float = 0.0


class TrialStore:
    """Trials of one study in ``path`` (created if absent). ``meta`` must match a store being resumed."""

    def __init__(self, path: str | Path, meta: dict[str, str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        old = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        for k, v in meta.items():
            if k in old and old[k] != v:
                raise SpecError("out", f"{self.path} holds a study with a different {k} ({old[k]!r}, now "
                                f"{v!r}); use another --out or the same settings to resume")
        self.db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", sorted(meta.items()))
        self.db.commit()
        self.by_key: dict[str, Trial] = {t.key: t for t in self.trials()}

    def add(self, t: Trial) -> None:
        """Write one trial and commit (so it survives an interruption right after)."""
        self.db.execute(
            "INSERT OR REPLACE INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (t.number, t.key, json.dumps(t.params, sort_keys=True, default=str), t.status, t.source,
             json.dumps(t.metrics, sort_keys=True), None if t.objectives is None else json.dumps(t.objectives),
             t.message, t.wall_s))
        self.db.commit()
        self.by_key[t.key] = t

    def trials(self) -> list[Trial]:
        rows = self.db.execute("SELECT * FROM trials ORDER BY number").fetchall()
        return [Trial(r[0], r[1], json.loads(r[2]), r[3], r[4], json.loads(r[5]),
                      None if r[6] is None else json.loads(r[6]), r[7], r[8]) for r in rows]

    def close(self) -> None:
        self.db.close()


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of ``points`` (every column minimised), in row order.

    A row is dominated when another is no worse in every column and better in one. O(n^2) in
    the worst case but vectorised per row; studies hold thousands of trials, not millions.
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or len(pts) == 0:
        return np.zeros(0, dtype=int)
    keep = []
    for i in range(len(pts)):
        others = np.delete(pts, i, axis=0)
        dominated = np.any(np.all(others <= pts[i], axis=1) & np.any(others < pts[i], axis=1))
        if not dominated:
            keep.append(i)
    return np.array(keep, dtype=int)
