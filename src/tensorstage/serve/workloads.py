"""Workloads: when requests arrive and how long their prompts and outputs are. Seeded, deterministic.

Arrivals: ``offline`` (all at t = 0, as trtllm-bench throughput and MLPerf Offline), ``poisson``
(exponential gaps at ``rate_per_s``, MLPerf Server, vLLM ``--request-rate``), ``gamma`` (gaps of
mean ``1/rate_per_s`` and coefficient of variation ``cv``: burstier for cv > 1, as vLLM's
``--burstiness``), ``closed`` (``concurrency`` clients, each sending its next request when the
last completes; arrival times are filled in by the loop).

Lengths: fixed, or ``uniform`` / ``normal`` / ``lognormal`` around the mean with a relative spread
(``spread`` = half-width / mean for uniform, standard deviation / mean otherwise), each at least 1;
or ``lengths_file``: (input, output) pairs drawn with replacement from a dataset's rows
(:func:`tensorstage.serve.traces.load_lengths`), as MLPerf's load generator draws samples at random
from its performance set; ``input_tokens``/``output_tokens`` are then unused.
Shared prefixes: ``prefix_groups`` groups of ``prefix_tokens`` leading tokens (system prompts),
request ``i`` in group ``i mod groups``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.serve.entities import RequestTable
from tensorstage.serve.traces import MAX_TOKENS, load_lengths

ARRIVALS = ("offline", "poisson", "gamma", "closed")
#: the most requests one simulation takes (100 M: about 10 GB of request table; a million-request run
#: takes about a minute)
MAX_REQUESTS = 100_000_000
LENGTHS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class Workload:
    """A synthetic workload (module docstring). ``concurrency`` is used by ``closed`` only."""

    num_requests: int
    input_tokens: int
    output_tokens: int
    arrival: str = "offline"
    rate_per_s: float = 0.0
    cv: float = 1.0
    concurrency: int = 0
    lengths: str = "fixed"
    spread: float = 0.0
    prefix_groups: int = 0
    prefix_tokens: int = 0
    seed: int = 0
    lengths_file: str | None = None

    def check(self) -> Workload:
        """Raise a one-line :class:`SpecError` naming the first bad field."""
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise SpecError("workload.num_requests", f"must be between 1 and {MAX_REQUESTS:,}, got {self.num_requests}")
        for name in ("input_tokens", "output_tokens"):
            if not 1 <= getattr(self, name) <= MAX_TOKENS:
                raise SpecError(f"workload.{name}", f"must be between 1 and {MAX_TOKENS:,}, got {getattr(self, name)}")
        if self.concurrency > MAX_REQUESTS:
            raise SpecError("workload.concurrency", f"must be at most {MAX_REQUESTS:,}, got {self.concurrency}")
        if self.arrival not in ARRIVALS:
            raise SpecError("workload.arrival", f"unknown arrival process {self.arrival!r}", ARRIVALS)
        if self.arrival in ("poisson", "gamma") and not self.rate_per_s > 0:
            raise SpecError("workload.rate_per_s", f"must be > 0 for {self.arrival} arrivals")
        if self.arrival == "gamma" and not self.cv > 0:
            raise SpecError("workload.cv", "must be > 0")
        if self.arrival == "closed" and self.concurrency < 1:
            raise SpecError("workload.concurrency", "must be >= 1 for closed-loop arrivals")
        if self.lengths not in LENGTHS:
            raise SpecError("workload.lengths", f"unknown length distribution {self.lengths!r} "
                            "(or give a CSV file of input_length,output_length rows)", LENGTHS)
        if self.spread < 0:
            raise SpecError("workload.spread", "must be >= 0")
        if self.lengths_file is not None and self.spread > 0:
            raise SpecError("workload.spread", "a length file gives every request its own lengths; drop --spread")
        if self.lengths_file is None and (self.lengths == "fixed") != (self.spread == 0):
            raise SpecError("workload.spread", f"{self.spread:g} with {self.lengths} lengths: uniform, normal and "
                            "lognormal need a spread > 0, fixed takes none", LENGTHS)
        if self.prefix_groups < 0 or self.prefix_tokens < 0:
            raise SpecError("workload.prefix_groups", "prefix groups and tokens must be >= 0")
        if self.lengths_file is not None:
            load_lengths(self.lengths_file)  # a bad file is a one-line error here, before any run
        elif self.prefix_groups and self.prefix_tokens >= self.input_tokens:
            raise SpecError("workload.prefix_tokens", "must be shorter than the input")
        return self

    def requests(self) -> RequestTable:
        """The request table (arrival times are 0 for ``closed``: the loop sets them)."""
        self.check()
        rng = np.random.default_rng(self.seed)
        n = self.num_requests
        if self.arrival == "poisson":
            arrival = np.cumsum(rng.exponential(1.0 / self.rate_per_s, n))
        elif self.arrival == "gamma":
            shape = 1.0 / self.cv**2
            arrival = np.cumsum(rng.gamma(shape, 1.0 / (self.rate_per_s * shape), n))
        else:
            arrival = np.zeros(n)
        if self.lengths_file is not None:
            rows_in, rows_out = load_lengths(self.lengths_file)
            pick = rng.integers(0, len(rows_in), n)
            isl, osl = rows_in[pick], rows_out[pick]
        else:
            isl = _lengths(rng, self.lengths, self.input_tokens, self.spread, n)
            osl = _lengths(rng, self.lengths, self.output_tokens, self.spread, n)
        pid = ptk = None
        if self.prefix_groups > 0 and self.prefix_tokens > 0:
            pid = np.arange(n) % self.prefix_groups
            ptk = np.minimum(np.full(n, self.prefix_tokens), isl - 1)
        return RequestTable.of(arrival, isl, osl, pid, ptk)


def workload_summary(workload: Workload | RequestTable) -> dict[str, object]:
    """What a run's requests were, enough to run it again: the synthetic workload's settings (only
    those its arrival process and lengths use), or a trace's request count."""
    if isinstance(workload, RequestTable):
        return {"arrival": "trace", "requests": len(workload)}
    w = workload
    out: dict[str, object] = {"arrival": w.arrival, "requests": w.num_requests, "seed": w.seed}
    if w.arrival in ("poisson", "gamma"):
        out["rate_per_s"] = w.rate_per_s
    if w.arrival == "gamma":
        out["cv"] = w.cv
    if w.arrival == "closed":
        out["concurrency"] = w.concurrency
    if w.lengths_file is not None:
        out["lengths_file"] = w.lengths_file
    else:
        out.update(input_tokens=w.input_tokens, output_tokens=w.output_tokens, lengths=w.lengths)
        if w.lengths != "fixed":
            out["spread"] = w.spread
    if w.prefix_groups:
        out.update(prefix_groups=w.prefix_groups, prefix_tokens=w.prefix_tokens)
    return out


def lengths_option(value: str) -> tuple[str, str | None]:
    """A ``--lengths`` value as (distribution, length file): a name of :data:`LENGTHS`, or a path
    (anything that is not a name and looks like one: a separator, a suffix, or an existing entry)."""
    if value not in LENGTHS and (Path(value).suffix or "/" in value or "\\" in value or Path(value).exists()):
        return "fixed", value
    return value, None


def _lengths(rng: np.random.Generator, kind: str, mean: int, spread: float, n: int) -> np.ndarray:
    if kind == "fixed" or spread == 0:
        return np.full(n, mean, dtype=np.int64)
    if kind == "uniform":
        x = rng.uniform(mean * (1 - spread), mean * (1 + spread), n)
    elif kind == "normal":
        x = rng.normal(mean, mean * spread, n)
    else:
        sigma2 = np.log1p(spread**2)
        x = rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), n)
    return np.maximum(1, np.rint(x)).astype(np.int64)


__all__ = ["ARRIVALS", "LENGTHS", "Workload", "lengths_option", "workload_summary"]
