"""Size limits every input is checked against before any work starts.

Why: a typo such as ``--dp 1000000000000`` or a config with ``num_layers: 1e12`` must be a
one-line error in milliseconds, not a table for a trillion GPUs, a hung ``show`` or a process
killed for memory after minutes. Each limit sits far above anything real, so no genuine input is
refused:

* :data:`MAX_WORLD` = 2**20 ranks (1,048,576): the largest published training clusters are about
  1e5 GPUs (Meta's 24k-GPU Llama 3 clusters, xAI's 100k-GPU Colossus), an order of magnitude
  below. The simulator works per rank class, but rank-indexed outputs (traces, rank maps) and the
  communicator arithmetic scale with the world size.
* :data:`MAX_LAYERS` = 10,000 transformer layers: published models have at most a few hundred
  (GPT-3 175B: 96; Llama 3.1 405B: 126); the graph is built per layer kind but some reports list
  every layer.
* :data:`INT64_MAX`: no integer input above a signed 64-bit value, which is what traces (Chakra
  protobuf ``int64``/``uint64`` fields), NumPy and JSON consumers can hold.
"""

from __future__ import annotations

INT64_MAX = 2**63 - 1
MAX_WORLD = 2**20
MAX_LAYERS = 10_000


def int_problem(value: object) -> str | None:
    """Why ``value`` is not acceptable where an integer is expected (a bool, or beyond int64), else None."""
    if isinstance(value, bool):
        return "expected a number, not true/false"
    if isinstance(value, int) and abs(value) > INT64_MAX:
        return f"beyond the int64 range (at most {INT64_MAX})"
    return None
