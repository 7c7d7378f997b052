"""Pipeline schedules: for each pipeline rank, the ordered compute actions it executes.

A schedule is only an *order*: rank ``r`` runs ``pipeline_order(...)[r]`` front to back, and
each action also waits for the actions it depends on (`dependencies`). Timing is left to the
consumer (the lowering turns remote dependencies into send/recv pairs; `simulate_order` in
:mod:`tensorstage.schedule.simulate` evaluates an order with unit times).

Conventions (Megatron-LM):

* ``pp`` ranks, ``vpp`` model chunks per rank, ``pp * vpp`` virtual stages. Model chunk ``c`` on
  rank ``r`` holds virtual stage ``c * pp + r``, so consecutive virtual stages sit on
  consecutive ranks and the activation of the last rank's chunk ``c`` wraps to rank 0's chunk
  ``c + 1``.
* Action kinds: ``F`` forward, ``B`` full backward (input-grad + weight-grad), and for the
  zero-bubble schedule ``I`` (input-grad only, which unblocks the previous stage) and ``W``
  (weight-grad only, which nothing remote waits for, so it can be moved into bubbles).

Schedules:

* ``gpipe``: all forwards, then all backwards (in microbatch order).
* ``1f1b``: Megatron / PipeDream-flush. Rank ``r`` does ``min(pp - r - 1, m)`` warmup
  forwards, then alternates one forward and one backward, then drains the remaining backwards.
  PyTorch's ``Schedule1F1B`` runs ``pp - r`` warmup forwards and then "1B1F"; the resulting
  compute order is the same sequence.
* ``interleaved``: Megatron-core's virtual pipeline (``forward_backward_pipelining_with_
  interleaving``) with microbatch groups of ``pp``: warmup ``2 (pp - r - 1) + (vpp - 1) pp``
  virtual microbatches (all of them if that reaches ``m * vpp``), then 1F1B over the virtual
  microbatch sequence in which each group of ``pp`` microbatches visits chunks ``0..vpp-1``
  (forwards) or ``vpp-1..0`` (backwards). Requires ``m % pp == 0``. Older Megatron-LM ran
  *all* forwards first whenever ``m == pp``; ``legacy_all_warmup=True`` reproduces that.
  PyTorch's ``ScheduleInterleaved1F1B`` equals the default for ``m % pp == 0``.
* ``zb-h1``: Qi et al., "Zero Bubble Pipeline Parallelism" (ICLR'24), ZB-H1. The 1F1B order
  with ``B`` split into ``I`` and ``W``; rank ``r`` keeps the 1F1B warmup (so the same number
  of microbatches wait for their input-grad, the activation-memory proxy) and defers its
  weight-grads by ``r`` steady-state steps; the deferred ``W`` run at the end, in the time the
  later ranks would otherwise wait for earlier ranks to drain. Bubble ``(p-1)(t_f + t_i - t_w)``
  instead of ``(p-1)(t_f + t_i + t_w)``: one third of 1F1B's when the three times are equal.
  This is the order PyTorch's ``ScheduleInterleavedZeroBubble`` builds with one stage per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tensorstage.errors import require

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1")


class Kind(StrEnum):
    """What an action computes."""

    F = "F"  # forward
    B = "B"  # full backward: input-grad and weight-grad
    I = "I"  # noqa: E741  (input-grad only; the name is the paper's and PyTorch's)
    W = "W"  # weight-grad only


@dataclass(frozen=True, slots=True)
class Action:
    """One compute step of one microbatch on one model chunk.

    ``chunk`` is the model chunk on the executing rank; ``stage`` is the virtual stage it holds
    (``chunk * pp + rank``), kept alongside so an action names its place in the pipeline without
    the rank (and so it prints like PyTorch's ``_Action``: ``"{stage}{kind}{microbatch}"``).
    """

    kind: Kind
    microbatch: int
    chunk: int = 0
    stage: int = 0

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"


@dataclass(frozen=True, slots=True)
class Message:
    """A point-to-point transfer implied by a cross-rank dependency.

    ``payload`` is ``"activation"`` (forward output of ``src_action.stage`` to the next stage)
    or ``"gradient"`` (input-grad of ``src_action.stage`` to the previous stage). ``tag`` is a
    function of (payload, microbatch, destination stage) only, so it does not depend on the
    schedule and is unique among all messages of one step.
    """

    payload: str
    src_rank: int
    src_action: Action
    dst_rank: int
    dst_action: Action
    tag: int


@dataclass(frozen=True, slots=True)
class StepComm:
    """An action with the message it must receive first and the one it sends when done."""

    action: Action
    recv: Message | None
    send: Message | None


def stage_rank(stage: int, pp: int) -> int:
    """Rank that holds virtual stage ``stage`` (Megatron: ``stage % pp``)."""
    return stage % pp


def stage_chunk(stage: int, pp: int) -> int:
    """Model chunk index of virtual stage ``stage`` on its rank (``stage // pp``)."""
    return stage // pp


def _act(kind: Kind, mb: int, chunk: int, rank: int, pp: int) -> Action:
    return Action(kind, mb, chunk, chunk * pp + rank)


def _validate(schedule: str, pp: int, microbatches: int, vpp: int) -> None:
    require(schedule in SCHEDULES, "schedule", f"unknown pipeline schedule {schedule!r}", SCHEDULES)
    require(isinstance(pp, int) and pp >= 1, "pp", f"pipeline degree must be an integer >= 1, got {pp!r}")
    require(
        isinstance(microbatches, int) and microbatches >= 1,
        "microbatches",
        f"number of microbatches must be an integer >= 1, got {microbatches!r}",
    )
    require(isinstance(vpp, int) and vpp >= 1, "vpp", f"virtual stages per rank must be >= 1, got {vpp!r}")
    if schedule == "interleaved":
        require(vpp >= 2, "vpp", "the interleaved schedule needs vpp >= 2 model chunks per rank")
        require(
            microbatches % pp == 0,
            "microbatches",
            f"interleaved 1F1B needs microbatches ({microbatches}) divisible by pp ({pp})",
        )
    else:
        require(vpp == 1, "vpp", f"schedule {schedule!r} runs one model chunk per rank; use interleaved")


def _gpipe(rank: int, pp: int, m: int) -> list[Action]:
    fwd = [_act(Kind.F, i, 0, rank, pp) for i in range(m)]
    return fwd + [_act(Kind.B, i, 0, rank, pp) for i in range(m)]


def _one_f_one_b(rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    order = [_act(Kind.F, i, 0, rank, pp) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: forward of the next, backward of the oldest
        order.append(_act(Kind.F, warmup + i, 0, rank, pp))
        order.append(_act(Kind.B, i, 0, rank, pp))
    order += [_act(Kind.B, i, 0, rank, pp) for i in range(m - warmup, m)]
    return order


def _zb_h1(rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    order = [_act(Kind.F, i, 0, rank, pp) for i in range(warmup)]
    next_w = 0
    for step in range(m):  # step-th input-grad, preceded by a forward while any remain
        if warmup + step < m:
            order.append(_act(Kind.F, warmup + step, 0, rank, pp))
        order.append(_act(Kind.I, step, 0, rank, pp))
        if step >= rank:  # rank r holds back r weight-grads for the drain phase
            order.append(_act(Kind.W, next_w, 0, rank, pp))
            next_w += 1
    order += [_act(Kind.W, i, 0, rank, pp) for i in range(next_w, m)]
    return order


def _virtual_table(pp: int, m: int, vpp: int) -> list[tuple[int, int]]:
    """(microbatch, chunk) of each forward virtual microbatch, Megatron-core's schedule table.

    Microbatches are taken in groups of ``pp``; each group runs through chunk 0, then chunk 1, ...
    """
    table: list[tuple[int, int]] = []
    for lo in range(0, m, pp):
        hi = min(lo + pp, m)
        table += [(mb, c) for c in range(vpp) for mb in range(lo, hi)]
    return table


def _interleaved(rank: int, pp: int, m: int, vpp: int, legacy_all_warmup: bool) -> list[Action]:
    total = m * vpp
    table = _virtual_table(pp, m, vpp)
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
    if warmup >= total or (legacy_all_warmup and m == pp):
        warmup = total

    def fwd(k: int) -> Action:
        mb, c = table[k]
        return _act(Kind.F, mb, c, rank, pp)

    def bwd(k: int) -> Action:
        mb, c = table[k]
        return _act(Kind.B, mb, vpp - 1 - c, rank, pp)

    order = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        order.append(fwd(warmup + k))
        order.append(bwd(k))
    order += [bwd(k) for k in range(total - warmup, total)]
    return order


def pipeline_order(
    schedule: str, pp: int, microbatches: int, vpp: int = 1, *, legacy_all_warmup: bool = False
) -> list[list[Action]]:
    """Per pipeline rank, the ordered compute actions of one training step.

    ``legacy_all_warmup`` only affects ``interleaved`` (see the module docstring). Raises
    :class:`SpecError` for unknown schedules, ``vpp`` with a single-chunk schedule, or an
    interleaved run whose microbatch count is not a multiple of ``pp``.
    """
    _validate(schedule, pp, microbatches, vpp)
    if schedule == "gpipe":
        return [_gpipe(r, pp, microbatches) for r in range(pp)]
    if schedule == "1f1b":
        return [_one_f_one_b(r, pp, microbatches) for r in range(pp)]
    if schedule == "zb-h1":
        return [_zb_h1(r, pp, microbatches) for r in range(pp)]
    return [_interleaved(r, pp, microbatches, vpp, legacy_all_warmup) for r in range(pp)]


# ----------------------------------------------------------------------------- dependencies

# Dependency keys: (class, microbatch, stage). "F" = forward done; "G" = input-grad done (by a
# B or an I); "W" = weight-grad done (by a B or a W). A B action completes both G and W.
DepKey = tuple[str, int, int]


def completes(action: Action) -> tuple[DepKey, ...]:
    """The dependency keys an action satisfies when it finishes."""
    mb, s = action.microbatch, action.stage
    if action.kind is Kind.F:
        return (("F", mb, s),)
    if action.kind is Kind.B:
        return (("G", mb, s), ("W", mb, s))
    if action.kind is Kind.I:
        return (("G", mb, s),)
    return (("W", mb, s),)


def dependencies(action: Action, num_stages: int) -> tuple[DepKey, ...]:
    """What ``action`` waits for, as dependency keys (see `completes`).

    F(mb, v) needs F(mb, v-1); B/I(mb, v) needs its own F(mb, v) and the input-grad of
    (mb, v+1); W(mb, v) needs I(mb, v). The first and last virtual stages have no upstream /
    downstream stage (the loss is part of the last stage's forward).
    """
    mb, s = action.microbatch, action.stage
    if action.kind is Kind.F:
        return (("F", mb, s - 1),) if s > 0 else ()
    if action.kind in (Kind.B, Kind.I):
        own = ("F", mb, s)
        return (own, ("G", mb, s + 1)) if s + 1 < num_stages else (own,)
    return (("G", mb, s),)


def _tag(payload: str, mb: int, dst_stage: int, num_stages: int) -> int:
    return 2 * (mb * num_stages + dst_stage) + (0 if payload == "activation" else 1)


def p2p_plan(orders: list[list[Action]], pp: int, vpp: int = 1) -> list[list[StepComm]]:
    """For each rank and each of its actions, the message it receives first and the one it sends.

    Only dependencies between different ranks are messages: the forward activation of stage
    ``v`` goes to stage ``v+1``'s forward, the input-grad of stage ``v`` (from a B or an I) goes
    to stage ``v-1``'s B or I. With ``pp == 1`` all stages share a rank and nothing is sent.
    Each message appears once as some action's ``send`` and once as another's ``recv``.
    """
    num_stages = pp * vpp
    bwd_input: dict[tuple[int, int], Action] = {}
    fwd: dict[tuple[int, int], Action] = {}
    for order in orders:
        for a in order:
            if a.kind is Kind.F:
                fwd[(a.microbatch, a.stage)] = a
            elif a.kind in (Kind.B, Kind.I):
                bwd_input[(a.microbatch, a.stage)] = a

    def message(payload: str, src: Action, dst: Action) -> Message | None:
        src_rank, dst_rank = stage_rank(src.stage, pp), stage_rank(dst.stage, pp)
        if src_rank == dst_rank:
            return None
        tag = _tag(payload, dst.microbatch, dst.stage, num_stages)
        return Message(payload, src_rank, src, dst_rank, dst, tag)

    plan: list[list[StepComm]] = []
    for order in orders:
        steps: list[StepComm] = []
        for a in order:
            recv = send = None
            mb, s = a.microbatch, a.stage
            if a.kind is Kind.F:
                if s > 0:
                    recv = message("activation", fwd[(mb, s - 1)], a)
                if s + 1 < num_stages:
                    send = message("activation", a, fwd[(mb, s + 1)])
            elif a.kind in (Kind.B, Kind.I):
                if s + 1 < num_stages:
                    recv = message("gradient", bwd_input[(mb, s + 1)], a)
                if s > 0:
                    send = message("gradient", a, bwd_input[(mb, s - 1)])
            steps.append(StepComm(a, recv, send))
        plan.append(steps)
    return plan


def format_order(orders: list[list[Action]]) -> str:
    """One line per rank, actions as ``{stage}{kind}{microbatch}`` (PyTorch's notation)."""
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in order) for r, order in enumerate(orders))


def check_order(orders: list[list[Action]], pp: int, microbatches: int, vpp: int = 1) -> None:
    """Raise ``ValueError`` unless every (microbatch, stage) gets exactly one F and one backward.

    The backward is either one B, or one I and one W; each action sits on the rank holding
    its stage, with a consistent chunk index.
    """
    seen: set[tuple[str, int, int]] = set()
    for rank, order in enumerate(orders):
        for a in order:
            if stage_rank(a.stage, pp) != rank or stage_chunk(a.stage, pp) != a.chunk:
                raise ValueError(f"action {a} is on rank {rank}, chunk {a.chunk}: wrong place")
            for key in completes(a):
                if key in seen:
                    raise ValueError(f"{key} is completed twice (by {a})")
                seen.add(key)
    want = {(k, mb, s) for k in ("F", "G", "W") for mb in range(microbatches) for s in range(pp * vpp)}
    if seen != want:
        missing = sorted(want - seen)[:5]
        raise ValueError(f"schedule misses {len(want - seen)} steps, e.g. {missing}")


__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Message",
    "StepComm",
    "check_order",
    "completes",
    "dependencies",
    "format_order",
    "p2p_plan",
    "pipeline_order",
    "stage_chunk",
    "stage_rank",
]
