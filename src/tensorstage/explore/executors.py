"""Executors: run full evaluations in this process, a local process pool, or on a Ray cluster.

Each yields ``(position, result)`` pairs *as they finish*, so the study stores every finished
trial at once (an interruption loses only the ones still running); the study orders trials by
position, so the table does not depend on which worker finished first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.explore.evaluate import training_step, work_estimate
from tensorstage.explore.setup import Task

Evaluate = Callable[[Task], dict[str, Any]]
Estimate = Callable[[Task], float]


def submit_order(tasks: Sequence[Task], fn: Evaluate, cost: Estimate | None) -> list[int]:
    """Positions in the order to start them: costliest first when ``cost`` is known (by default
    :func:`~tensorstage.explore.evaluate.work_estimate` for the training evaluator), ties and
    unknown costs in position order. Only the schedule changes; results stay keyed by position."""
    if cost is None and fn is training_step:
        cost = work_estimate
    if cost is None:
        return list(range(len(tasks)))
    est = [cost(t) for t in tasks]
    return sorted(range(len(tasks)), key=lambda i: (-est[i], i))


class LocalExecutor:
    """``workers == 1``: evaluate in this process (no start-up cost, easiest to debug); more: a
    process pool whose workers keep their caches (graphs, systems) between tasks, fed costliest
    task first (:func:`submit_order`)."""

    def __init__(self, workers: int = 1, fn: Evaluate = training_step, cost: Estimate | None = None) -> None:
        if workers < 1:
            raise SpecError("workers", f"must be >= 1, got {workers}")
        self.workers = workers
        self.fn = fn
        self.cost = cost
        self._pool: ProcessPoolExecutor | None = None

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, dict[str, Any]]]:
        if self.workers == 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                yield i, self.fn(t)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        futures = {self._pool.submit(self.fn, tasks[i]): i for i in submit_order(tasks, self.fn, self.cost)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=futures.__getitem__):
                yield futures[f], f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Tasks as Ray remote functions on the cluster at ``address`` (``None``: a local cluster with
    ``num_cpus`` CPUs is started for the run and stopped by :meth:`close`). Needs the ``explore``
    extra (``pip install tensorstage[explore]``)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, fn: Evaluate = training_step,
                 cost: Estimate | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise SpecError("ray", "Ray is not installed (pip install 'tensorstage[explore]')") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            if address:
                check_reachable(address)  # ray.init retries an unreachable address for minutes
            kw: dict[str, Any] = {"address": address} if address else {"num_cpus": num_cpus or 2}
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kw)
        self.remote = ray.remote(fn)
        self.fn, self.cost = fn, cost

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, dict[str, Any]]]:
        refs = {self.remote.remote(tasks[i]): i for i in submit_order(tasks, self.fn, self.cost)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for r in done:
                yield refs[r], self.ray.get(r)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


#: Seconds to wait for a TCP connection to a Ray cluster's address before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """One-line ``SpecError`` unless a TCP connection to Ray address ``HOST:PORT`` (or ``ray://HOST:PORT``)
    opens within ``timeout_s``; ``auto`` / ``local`` are Ray's own lookups and pass."""
    import socket

    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpecError("--ray-address", f"expected HOST:PORT (or ray://HOST:PORT, auto), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SpecError("--ray-address", f"cannot reach {address} ({exc.strerror or exc})") from None


def make_executor(workers: int = 1, ray: bool = False, address: str | None = None,
                  fn: Evaluate = training_step) -> LocalExecutor | RayExecutor:
    """The executor the CLI flags ask for (``--workers W`` or ``--ray [ADDRESS]``)."""
    return RayExecutor(address, workers if workers > 1 else None, fn) if ray else LocalExecutor(workers, fn)
