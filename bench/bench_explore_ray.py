"""Scale-out and crash checks of ``tensorstage explore`` that are too slow for the unit tests.

Usage::

    .venv/bin/python bench/bench_explore_ray.py            # needs the explore extra (ray)

1. The same study (a 16-GPU layout space of megatron-1.7b, full simulation, 8 evaluations) on a
   local process pool of two workers and on a local two-worker Ray cluster started here: the
   trial tables must be identical (numbers, configurations, statuses, objective values).
2. ``tensorstage explore`` in a subprocess is killed with SIGKILL once some trials are stored; the
   same command then resumes; the finished trials are kept byte-for-byte and the final table equals
   an uninterrupted run's.
Prints a table of what matched and the wall seconds of each run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tensorstage.explore.executors import LocalExecutor, RayExecutor
from tensorstage.explore.search import STORE_NAME, run_study
from tensorstage.explore.space import parse_space
from tensorstage.report.console import print_table

SPACE = {"name": "ray-check", "model": "megatron-1.7b", "system": "dgx-a100-selene", "gpus": 16,
         "fixed": {"seq": 2048, "global_batch": 64, "dtype": "fp16"},
         "parameters": {"plan": {"tp": {"pow2": [1, 8]}, "pp": {"pow2": [1, 4]}, "micro_batch": [1, 2],
                                 "recompute": ["selective", "full"]}},
         "derived": {"dp": "gpus // (tp * pp)", "sp": "tp > 1"},
         "constraints": ["tp * pp * dp == gpus", "global_batch % (dp * micro_batch) == 0"],
         "objectives": [{"metric": "step_time_s", "goal": "min"}], "budget": 8, "evaluator": "full"}


def table(res) -> list[tuple]:
    return [(t.number, t.key, t.status, t.objectives) for t in res.trials]


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT number, key, status, objectives FROM trials ORDER BY number").fetchall()


def main() -> None:
    out = []
    sp = parse_space(SPACE)
    t0 = time.perf_counter()
    pool = LocalExecutor(2)
    a = run_study(sp, "random", 8, None, seed=4, batch=4, executor=pool)
    pool.close()
    t_pool = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray = RayExecutor(None, 2)
    b = run_study(sp, "random", 8, None, seed=4, batch=4, executor=ray)
    ray.close()
    t_ray = time.perf_counter() - t0
    out.append(["process pool (2) == Ray local cluster (2 CPUs)", table(a) == table(b), len(a.trials),
                f"{t_pool:.1f} / {t_ray:.1f}"])

    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(yaml.safe_dump({**SPACE, "budget": 12}, sort_keys=False))
        cmd = [sys.executable, "-m", "tensorstage.cli", "explore", str(space), "--agent", "random", "--seed", "4",
               "--batch", "2", "--out"]
        killed, whole = Path(tmp) / "killed", Path(tmp) / "whole"
        proc = subprocess.Popen([*cmd, str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=os.environ.copy())
        db = killed / STORE_NAME
        while proc.poll() is None:
            time.sleep(0.2)
            try:
                if db.exists() and len(rows(db)) >= 4:
                    break
            except sqlite3.Error:  # the writer holds a lock for a moment
                continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = rows(db)
        t0 = time.perf_counter()
        subprocess.run([*cmd, str(killed)], check=True, stdout=subprocess.DEVNULL)
        t_resume = time.perf_counter() - t0
        after = rows(db)
        subprocess.run([*cmd, str(whole)], check=True, stdout=subprocess.DEVNULL)
        ref = rows(whole / STORE_NAME)
        out.append(["SIGKILL then resume: finished trials kept", after[: len(before)] == before, len(before),
                    f"{t_resume:.1f}"])
        out.append(["resumed table == uninterrupted table", after == ref, len(after), ""])
    print_table("explore: Ray equivalence and crash resume", ["check", "holds", "trials", "wall_s"], out)


if __name__ == "__main__":
    main()
