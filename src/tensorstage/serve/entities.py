"""Entities of the serving simulation: the request table and the per-step record.

Requests live in one structure of numpy arrays (not one object per request) so a million of them
cost a few tens of MB and metrics are vectorised. Replicas (:mod:`tensorstage.serve.replica`) hold
only the indices of the requests they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestTable:
    """All requests of a run, by index. Times in seconds; ``nan`` until the event happens.

    ``prefix_id`` >= 0 names a shared prompt prefix of ``prefix_tokens`` tokens (system prompt,
    earlier turns): a replica with a prefix cache that has seen it skips computing those tokens.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_id: np.ndarray
    prefix_tokens: np.ndarray
    first_token_s: np.ndarray = field(init=False)
    finish_s: np.ndarray = field(init=False)
    replica: np.ndarray = field(init=False)
    preemptions: np.ndarray = field(init=False)
    cached_tokens: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.replica = np.full(n, -1, dtype=np.int64)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.cached_tokens = np.zeros(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @staticmethod
    def of(arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray,
           prefix_id: np.ndarray | None = None, prefix_tokens: np.ndarray | None = None) -> RequestTable:
        """A table from arrays (copied; integer lengths, float times)."""
        n = len(arrival_s)
        pid = np.full(n, -1, dtype=np.int64) if prefix_id is None else np.asarray(prefix_id, dtype=np.int64)
        ptk = np.zeros(n, dtype=np.int64) if prefix_tokens is None else np.asarray(prefix_tokens, dtype=np.int64)
        return RequestTable(np.asarray(arrival_s, dtype=np.float64).copy(),
                            np.asarray(prompt_tokens, dtype=np.int64).copy(),
                            np.asarray(output_tokens, dtype=np.int64).copy(), pid.copy(), ptk.copy())


@dataclass
class StepLog:
    """One row per engine step of every replica (columns as lists, turned into arrays at the end)."""

    replica: list[int] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    end_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    prefill_tokens: list[int] = field(default_factory=list)
    decodes: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    kv_blocks_used: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)

    def add(self, replica: int, start_s: float, end_s: float, tokens: int, prefill_tokens: int,
            decodes: int, running: int, waiting: int, kv_blocks_used: int, emitted: int) -> None:
        """Append one step."""
        self.replica.append(replica)
        self.start_s.append(start_s)
        self.end_s.append(end_s)
        self.tokens.append(tokens)
        self.prefill_tokens.append(prefill_tokens)
        self.decodes.append(decodes)
        self.running.append(running)
        self.waiting.append(waiting)
        self.kv_blocks_used.append(kv_blocks_used)
        self.emitted.append(emitted)

    def add_run(self, replica: int, start_s: float, durations_s: np.ndarray, decodes: int, running: int,
                kv_blocks_used: np.ndarray) -> None:
        """Append a run of decode-only steps (one row each)."""
        k = len(durations_s)
        ends = (start_s + np.cumsum(durations_s)).tolist()
        self.replica.extend([replica] * k)
        self.start_s.append(float(start_s))
        self.start_s.extend(ends[:-1])
        self.end_s.extend(ends)
        per_step = [decodes] * k
        zeros = [0] * k
        self.tokens.extend(per_step)
        self.prefill_tokens.extend(zeros)
        self.decodes.extend(per_step)
        self.running.extend([running] * k)
        self.waiting.extend(zeros)
        self.kv_blocks_used.extend(np.asarray(kv_blocks_used).tolist())
        self.emitted.extend(per_step)

    def arrays(self) -> dict[str, np.ndarray]:
        """Columns as numpy arrays."""
        return {k: np.asarray(v) for k, v in self.__dict__.items()}


__all__ = ["RequestTable", "StepLog"]
