"""What one rank executes in a replay: a flat list of operations, as plain data.

Both the microbenchmarks and the replay of a lowered plan become, per rank, a list of
:class:`Op` s that the worker process (:mod:`tensorstage.replay.worker`) runs in order through
``torch.distributed`` (gloo). Plain dicts on the wire (JSON job files), so the worker needs
nothing from the rest of the package and starts fast.

Sizes: ``bytes`` is the *full* buffer ``S`` in the nccl-tests convention for every collective
(all-reduce: the buffer; all-gather: the gathered output; reduce-scatter: the input; all-to-all:
the per-rank buffer) and the message for send/recv. :func:`astra_comm_bytes` converts to the
ASTRA-sim ``comm_size`` convention the simulator's formulas take.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Operation kinds a worker runs. ``barrier`` synchronizes the communicator before a measured op;
#: ``wait`` stands in for a compute node (sleep of ``wait_s``).
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
P2P = ("send", "recv")
KINDS = (*COLLECTIVES, *P2P, "barrier", "wait")
#: The benchmarked operation names: the collectives plus ``send_recv`` (one sender, one receiver).
BENCH_OPS = (*COLLECTIVES, "send_recv")

#: How a worker runs a collective: ``p2p`` = the simulator's algorithm (ring reduce-scatter,
#: all-gather and all-reduce, direct all-to-all) on send/recv (:mod:`tensorstage.replay.algorithms`);
#: ``native`` = gloo's own collective (its reduce-scatter all-reduces the whole input).
COLLECTIVE_IMPLS = ("p2p", "native")

#: float32 elements: every buffer is a whole number of them.
ELEMENT_BYTES = 4


@dataclass(frozen=True)
class Op:
    """One operation of one rank.

    ``group``: index into the job's communicator list (-1 = all ranks). ``peer``: global rank of
    the other side of a send/recv. ``record``: keep its start/end in the results (warm-up and
    barriers are not kept). ``key``: what ties the same operation together across ranks (the
    microbenchmark sample or the program node) for the measured-time reduction.
    """

    kind: str
    bytes: int = 0
    group: int = -1
    peer: int = -1
    tag: int = 0
    wait_s: float = 0.0
    record: bool = True
    key: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def elements(nbytes: int, divisor: int = 1) -> int:
    """float32 elements of a buffer of ``nbytes`` rounded down to a multiple of ``divisor`` (>= divisor)."""
    n = nbytes // ELEMENT_BYTES
    return max(divisor, n - n % divisor)


def astra_comm_bytes(kind: str, full_bytes: float, n: int) -> float:
    """ASTRA-sim ``comm_size`` of a collective whose full buffer is ``full_bytes`` (see module doc)."""
    return full_bytes / n if kind == "all_gather" else full_bytes
