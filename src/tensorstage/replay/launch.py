"""Start R worker processes, wait for them within a time limit, collect their records.

Why separate processes (not threads): gloo's cost on real sockets is what is measured, and in
the emulated-network mode every rank lives in its own network namespace, which only a process
can enter (``ip netns exec``). Workers run in their own process group, so a Ctrl-C reaches only this
process, which then stops every worker it started (by pid) before the network is torn down.

Bounded in time: the whole run has a wall-clock limit (``timeout_s``); on expiry, on a worker
failing or on an interrupt every worker is killed and a one-line error (naming the first failing
rank and the last line of its stderr) is raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tensorstage.errors import SpecError
from tensorstage.replay.ops import COLLECTIVE_IMPLS, Op


@dataclass(frozen=True)
class Placement:
    """Where ranks run: ``namespaces[r]`` (None = this namespace), the address rank 0 listens on,
    and the interface name gloo must bind to in every rank."""

    namespaces: tuple[str | None, ...]
    master_addr: str
    ifname: str

    @staticmethod
    def loopback(ranks: int) -> Placement:
        return Placement((None,) * ranks, "127.0.0.1", "lo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _src_path() -> str:
    """The folder holding the ``tensorstage`` package, so workers import this same copy."""
    return str(Path(__file__).resolve().parents[2])


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_ranks(groups: list[list[int]], ops: list[list[Op]], placement: Placement, timeout_s: float,
              port: int | None = None, collectives: str = "p2p", node_size: int | None = None) -> list[dict]:
    """Run ``ops[r]`` on rank ``r`` of ``len(ops)`` processes; returns each rank's result dict.

    ``groups``: communicators (global ranks) every rank creates in this order; ops refer to them
    by index. ``collectives``: ``p2p`` (the simulator's algorithms on send/recv,
    :mod:`tensorstage.replay.algorithms`) or ``native`` (gloo's own collectives). ``node_size``:
    ranks per emulated node (rank ``r`` is on node ``r // node_size``), for the p2p rings'
    channels; None = one node. Raises
    :class:`SpecError` (field ``replay``) on a failure or the time limit.
    """
    import importlib.util

    if collectives not in COLLECTIVE_IMPLS:
        raise SpecError("collectives", f"unknown implementation {collectives!r}", COLLECTIVE_IMPLS)
    if importlib.util.find_spec("torch") is None:
        raise SpecError("replay", "needs PyTorch for torch.distributed (pip install 'tensorstage[replay]')")
    world = len(ops)
    port = port or _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_src_path(), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="tensorstage-replay-") as tmp:
        work = Path(tmp)
        try:
            for r in range(world):
                job = {"rank": r, "world": world, "master_addr": placement.master_addr, "master_port": port,
                       "ifname": placement.ifname, "timeout_s": timeout_s, "groups": groups,
                       "collectives": collectives, "node_size": node_size,
                       "ops": [o.to_dict() for o in ops[r]]}
                (work / f"job{r}.json").write_text(json.dumps(job))
                cmd = [sys.executable, "-m", "tensorstage.replay.worker", str(work / f"job{r}.json"),
                       str(work / f"out{r}.json")]
                ns = placement.namespaces[r]
                if ns is not None:
                    cmd = ["ip", "netns", "exec", ns, *cmd]
                with open(work / f"err{r}.txt", "wb") as err:
                    procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                                  start_new_session=True))
            deadline = time.monotonic() + timeout_s
            while True:
                codes = [p.poll() for p in procs]
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    r = bad[0]
                    raise SpecError("replay", f"rank {r} failed (exit {codes[r]}): "
                                    f"{_last_line(work / f'err{r}.txt') or 'no message'}")
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise SpecError("replay", f"did not finish within {timeout_s:g} s (raise --timeout-s "
                                    "or lower --scale / --max-bytes)")
                time.sleep(0.05)
            return [json.loads((work / f"out{r}.json").read_text()) for r in range(world)]
        finally:
            _stop(procs)
