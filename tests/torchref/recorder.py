"""Record every collective and point-to-point op a rank issues, at the c10d dispatcher boundary.

Why a ``TorchDispatchMode`` and not the profiler: with the gloo backend torch 2.13 emits no
``record_param_comms`` events (only ``gloo:all_reduce``-style ranges without group ranks, and a
reduce-scatter shows up as ``gloo:all_reduce`` because gloo implements it with an all-reduce).
Every ``ProcessGroup`` method, including calls made from C++ (DDP's ``Reducer``, ``_broadcast_coalesced``,
FSDP2's ``all_gather_into_tensor``/``reduce_scatter_tensor``, DTensor's functional collectives,
pipelining's ``batch_isend_irecv``), goes through a dispatcher op in the ``c10d`` or
``_c10d_functional`` namespace, and an active Python dispatch mode sees those ops with their
``ProcessGroup`` argument, so group ranks, peers and exact tensor sizes are all available.
The mode is thread-local state that autograd propagates to its CPU backward, so gradient hooks are seen.

Tensor subclasses (DTensor) are handed back with ``NotImplemented`` so that DTensor desugars into plain
functional collectives first, which the mode then records (the trick ``CommDebugMode`` uses).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

COMM_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")

# op name (without namespace) -> canonical collective type
_CANONICAL: dict[str, str] = {
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "allgather_": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_out": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "alltoall_": "all_to_all",
    "alltoall_base_": "all_to_all",
    "all_to_all_single": "all_to_all",
    "broadcast_": "broadcast",
    "broadcast": "broadcast",
    "reduce_": "reduce",
    "gather_": "gather",
    "scatter_": "scatter",
    "send": "send",
    "isend": "send",
    "recv_": "recv",
    "irecv": "recv",
    "recv_any_source_": "recv",
    "barrier": "barrier",
    "monitored_barrier_": "barrier",
}
_IGNORED = {"wait_tensor", "check_for_nan", "_wrap_tensor_autograd"}  # not communication


@dataclass
class CommRecord:
    """One communication op as issued by one rank.

    ``in_bytes``/``out_bytes`` are this rank's input and output buffers: for all-gather the shard and the
    gathered result, for reduce-scatter the full input and the output shard. ``size_bytes`` follows
    ASTRA-sim's ``comm_size`` convention (all-gather: shard; reduce-scatter: full input; all-to-all: input;
    all-reduce/broadcast/send/recv: the buffer). ``peer``/``root`` are global ranks.
    """

    seq: int
    phase: str
    op: str
    api: str
    dtype: str
    group_ranks: list[int]
    group_size: int
    in_bytes: int
    out_bytes: int
    size_bytes: int
    n_tensors: int = 1
    peer: int | None = None
    root: int | None = None
    tag: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON (group ranks as a list, no tensors)."""
        return asdict(self)


def _tensors(x: Any) -> list[torch.Tensor]:
    """Flatten tensors out of nested lists/tuples (``Tensor[][]`` schema args)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        out: list[torch.Tensor] = []
        for item in x:
            out.extend(_tensors(item))
        return out
    return []


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _dtype(x: Any) -> str:
    ts = _tensors(x)
    return str(ts[0].dtype).replace("torch.", "") if ts else "none"


def _resolve_group(pg_or_name: Any) -> dist.ProcessGroup:
    """Turn a boxed ``ProcessGroup`` ScriptObject or a group name into a ``ProcessGroup``."""
    if isinstance(pg_or_name, dist.ProcessGroup):
        return pg_or_name
    if isinstance(pg_or_name, str):
        return c10d._resolve_process_group(pg_or_name)
    return dist.ProcessGroup.unbox(pg_or_name)


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map schema argument names to values (positional, keyword, or default)."""
    bound: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


class CommRecorder(TorchDispatchMode):
    """Dispatch mode that appends a :class:`CommRecord` for every comm op issued inside it.

    Set ``recorder.phase`` between regions (e.g. ``"fwd"``, ``"bwd"``) to label records.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[CommRecord] = []
        self.phase = "default"
        self._depth = 0

    def __torch_dispatch__(self, func: Any, types: Iterable[type], args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar to plain collectives first
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        if ns not in COMM_NAMESPACES or name in _IGNORED or self._depth > 0:
            return func(*args, **kwargs)
        bound = _bind(func, args, kwargs)
        self._depth += 1
        try:
            result = func(*args, **kwargs)
        finally:
            self._depth -= 1
        self.records.append(self._make_record(ns, name, bound, result))
        return result

    def _make_record(self, ns: str, name: str, b: dict[str, Any], result: Any) -> CommRecord:
        op = _CANONICAL.get(name)
        if op is None:
            raise NotImplementedError(f"unrecorded comm op {ns}::{name}")
        pg_arg = b.get("process_group", b.get("group_name"))
        pg = _resolve_group(pg_arg)
        ranks = [int(r) for r in dist.get_process_group_ranks(pg)]
        peer = root = tag = None
        extra: dict[str, Any] = {}
        if ns == "c10d":
            if "input_tensor" in b:  # _allgather_base_, _reduce_scatter_base_
                inp, out = b["input_tensor"], b["output_tensor"]
            elif "input_tensors" in b:
                inp, out = b["input_tensors"], b["output_tensors"]
            elif "input" in b:  # alltoall_base_
                inp, out = b["input"], b["output"]
                extra = {"in_splits": list(b["input_split_sizes"]), "out_splits": list(b["output_split_sizes"])}
            elif "inputs" in b:
                inp, out = b["inputs"], b["outputs"]
            elif "input_list" in b:
                inp, out = b["input_list"], b["output_lists"]
            else:  # allreduce_, broadcast_, send, recv_, reduce_, barrier
                inp = out = b.get("tensors", b.get("tensor"))
            if "dst" in b:
                peer = dist.get_global_rank(pg, int(b["dst"]))
            if "src" in b:
                peer = dist.get_global_rank(pg, int(b["src"]))
            if "root_rank" in b:
                root = dist.get_global_rank(pg, int(b["root_rank"]))
            tag = b.get("tag")
        else:  # functional: output is the result
            inp = b.get("input", b.get("inputs", b.get("tensor")))
            out = b.get("out", result)
            if name.startswith(("all_reduce", "broadcast")) and name.endswith("_"):
                out = inp
            if "src" in b and op == "broadcast":
                root = dist.get_global_rank(pg, int(b["src"]))
            elif "src" in b:
                peer = dist.get_global_rank(pg, int(b["src"]))
            if "dst" in b:
                peer = dist.get_global_rank(pg, int(b["dst"]))
            tag = b.get("tag")
            if op == "all_to_all":
                extra = {"in_splits": [int(s) for s in b["input_split_sizes"]],
                         "out_splits": [int(s) for s in b["output_split_sizes"]]}
        in_bytes, out_bytes = _nbytes(inp), _nbytes(out)
        if op == "barrier":
            in_bytes = out_bytes = 0
        size_bytes = in_bytes if op in ("all_gather", "reduce_scatter", "all_to_all") else out_bytes
        return CommRecord(
            seq=len(self.records), phase=self.phase, op=op, api=f"{ns}::{name}",
            dtype=_dtype(inp) if _tensors(inp) else _dtype(out),
            group_ranks=ranks, group_size=len(ranks), in_bytes=in_bytes, out_bytes=out_bytes,
            size_bytes=size_bytes, n_tensors=len(_tensors(inp)), peer=peer, root=root,
            tag=None if tag is None else int(tag), extra=extra,
        )


def group_key(ranks: Iterable[int]) -> str:
    """JSON-able key of a group: its global ranks joined by commas (``"0,1"``)."""
    return ",".join(str(r) for r in ranks)


def aggregate(records: Iterable[dict[str, Any]], phases: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Sum records by ``"op@group"`` (p2p ops keyed ``"send@peer"``): bytes, in/out bytes and count.

    ``phases`` keeps only records whose phase is listed (``None`` keeps all).
    """
    keep = None if phases is None else set(phases)
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if keep is not None and r["phase"] not in keep:
            continue
        where = str(r["peer"]) if r["op"] in ("send", "recv") else group_key(r["group_ranks"])
        key = f"{r['op']}@{where}"
        acc = out.setdefault(key, {"size_bytes": 0, "in_bytes": 0, "out_bytes": 0, "count": 0})
        acc["size_bytes"] += r["size_bytes"]
        acc["in_bytes"] += r["in_bytes"]
        acc["out_bytes"] += r["out_bytes"]
        acc["count"] += 1
    return dict(sorted(out.items()))
