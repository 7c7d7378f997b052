"""Spawn a gloo world on localhost, run scenarios on every rank, and collect their records.

One world can run several scenarios back to back (each with its own recorder), because starting
processes is the slow part (seconds each on a small CPU box); tests group checks per world.
Results travel back as one JSON file per rank in a temp dir, so nothing needs to be picklable
except the scenario names and configs.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .recorder import CommRecorder, aggregate

ScenarioFn = Callable[[dict[str, Any], CommRecorder, int, int], dict[str, Any]]
SCENARIOS: dict[str, ScenarioFn] = {}


def scenario(name: str) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a per-rank scenario ``fn(cfg, recorder, rank, world_size) -> info`` under ``name``."""

    def deco(fn: ScenarioFn) -> ScenarioFn:
        SCENARIOS[name] = fn
        return fn

    return deco


def free_port() -> int:
    """Ask the OS for a free TCP port on localhost (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[str, dict[str, Any]]], out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results: dict[str, Any] = {}
    try:
        for label, cfg in jobs:
            torch.manual_seed(int(cfg.get("seed", 0)))
            dist.barrier()  # not recorded: keeps scenarios from overlapping across ranks
            rec = CommRecorder()
            with rec:
                info = SCENARIOS[cfg["scenario"]](cfg, rec, rank, world_size)
            dist.barrier()
            records = [r.to_json() for r in rec.records]
            results[label] = {"records": records, "totals": aggregate(records), "info": info}
    finally:
        dist.destroy_process_group()
    tmp = os.path.join(out_dir, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))


def run_world(jobs: dict[str, dict[str, Any]], world_size: int, start_method: str = "fork",
              timeout_s: float = 180.0) -> dict[str, Any]:
    """Run ``jobs`` (label -> config with a ``"scenario"`` key) in one gloo world of ``world_size`` ranks.

    Returns ``{label: {"ranks": {rank: [records]}, "totals": {rank: {"op@group": {...}}},
    "info": {rank: {...}}}}``. Ranks are ints in Python; ``json.dumps`` turns them into strings.
    ``start_method="fork"`` avoids re-importing torch per rank (~2 s each); use ``"spawn"`` if the
    parent has started threads. A world still running after ``timeout_s`` is killed (``TimeoutError``),
    so a hung collective cannot hang the test suite.
    """
    unknown = sorted({c["scenario"] for c in jobs.values()} - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    job_list = list(jobs.items())
    with tempfile.TemporaryDirectory(prefix="torchref-") as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), job_list, out_dir),
                                 nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                raise TimeoutError(f"gloo world of {world_size} ranks did not finish in {timeout_s} s")
        per_rank = {}
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                per_rank[rank] = json.load(f)
    out: dict[str, Any] = {}
    for label, _ in job_list:
        out[label] = {
            "ranks": {r: per_rank[r][label]["records"] for r in range(world_size)},
            "totals": {r: per_rank[r][label]["totals"] for r in range(world_size)},
            "info": {r: per_rank[r][label]["info"] for r in range(world_size)},
        }
    return out
