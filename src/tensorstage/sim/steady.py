"""Steady-state extrapolation over the micro-batch count: big steps without simulating every node.

Why: a pipeline step with ``m`` micro-batches costs ``O(m)`` nodes to lower and simulate (the 1T
Megatron case: PP 64, 512 micro-batches, ~1 M nodes even fused). Once every stage is in its
steady state (``m`` at least the number of virtual stages), each extra micro-batch adds exactly
the same work to every rank class and shifts the end of the step by the same amount, so every
additive quantity of the result (step time, compute by category and op, exposed communication,
bubble, FLOPs, node counts) is an affine function of ``m``.

:func:`extrapolate` takes results at three evenly spaced counts ``m1 < m2 < m3`` (all past the
warm-up), *checks* that every quantity's increment from ``m1`` to ``m2`` equals the one from ``m2``
to ``m3`` closely enough that the difference, carried to the target, moves the result by less than
1e-9 of itself (or of the step time, for times); memory peaks must be equal. The per-label split of
exposed communication is not additive (a proportional split of the union); its inputs are, so it
is recomputed from the extrapolated total and per-label uncovered times. Only then does it return the
affine extrapolation to the target ``m``; otherwise ``None`` and the caller simulates in full.
MFU, HFU and tokens/s are recomputed from the extrapolated FLOPs and step time.

**Settling transients** (:func:`extrapolate_settling`). Some steps reach their steady state only
asymptotically: overlapped ZeRO-3 gathers slow the compute they overlap, and the overlap settles
by a constant factor per micro-batch (GPT-3 175B, TP 8, PP 16, ZeRO-3: stage 0's per-micro-batch
compute increment moves by 1.2e-4, 4.6e-5, 1.6e-5, 4.9e-6 s over micro-batches 18-22, a ratio of
0.31-0.37), so no window passes the affine check and a 384-micro-batch step used to be simulated
in full (26 CPU s). After the window shifts, five counts give four increments ``d_i``; a quantity
whose increments follow ``d_i = d_inf + K rho^i`` (the three second differences of one sign, their
two ratios equal within :data:`SETTLE_RATIO_TOL` and below :data:`SETTLE_MAX_RATIO`) is carried to
the target with the limit increment (Aitken's delta-squared extrapolation), provided the whole
transient left after the window, even if the model were wrong, could move it by at most
:data:`SETTLE_TOL` of the step time. Irregular differences (signs changing, ratios that disagree:
pipelines of uneven stages that settle into a different regime later) are refused as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import fields, replace
from typing import Any, TypeVar

from tensorstage.parallel.plan import ParallelPlan
from tensorstage.sim.result import ClassResult, SimResult, split_exposed

T = TypeVar("T")

#: Bound on the extrapolation error a non-constant increment could cause, relative to the larger of
#: the extrapolated value and (for times) the extrapolated step time.
REL_TOL = 1e-9
#: Second differences below this fraction of the values (or of the step time, for times) are float
#: rounding of sums over ~1e5 terms, not a drift, and pass.
NOISE = 1e-12

_CLASS_LINEAR = ("nodes", "finish_s", "compute_busy_s", "compute_by_category_s", "compute_by_op_s", "comm_busy_s",
                 "exposed_comm_raw_s", "exposed_comm_total_s", "sync_wait_s", "bubble_s", "optimizer_s",
                 "executed_flops", "model_flops")
_CLASS_SAME = ("class_key", "ranks", "memory_peak_bytes", "memory_at_peak_bytes", "oom")


def _affine(a: Any, b: Any, c: Any, steps: float, what: str, floor: float = 0.0) -> Any:
    """Value at ``c`` + ``steps`` increments, after checking that ``b - a`` and ``c - b`` differ by
    less than could move the result by :data:`REL_TOL` of itself or of ``floor`` even if the
    increment kept drifting by that much every step (a quadratic bound), or by no more than float
    rounding (:data:`NOISE`); scalars or dicts."""
    if isinstance(c, dict):
        keys = set(a) | set(b) | set(c)
        return {k: _affine(a.get(k, 0), b.get(k, 0), c.get(k, 0), steps, f"{what}.{k}", floor) for k in sorted(keys)}
    d1, d2 = b - a, c - b
    value = c + steps * d2
    drift = abs(d2 - d1)
    if drift > NOISE * max(abs(a), abs(b), abs(c), floor, 1e-12) and (
            drift * max(1.0, steps) ** 2 > REL_TOL * max(abs(value), abs(c), floor, 1e-12)):
        raise _NotAffine(what)
    return round(value) if isinstance(c, int) and not isinstance(c, bool) else value


class _NotAffine(Exception):
    pass


def extrapolate(r1: SimResult, r2: SimResult, r3: SimResult, spacing: int, steps_to_target: float,
                tokens_per_step: int) -> SimResult | None:
    """The result ``steps_to_target`` spacings past ``r3`` (see module docstring), or ``None`` if the
    three results are not affine in the micro-batch count or differ in anything that should not change."""
    return _extrapolated([r1, r2, r3], spacing, steps_to_target, tokens_per_step,
                         lambda v, steps, what, floor: _affine(v[0], v[1], v[2], steps, what, floor))


#: Settling transients (module docstring): the geometric ratio of successive second differences
#: must be below this, the two ratios must agree within this fraction of the larger, and what is left
#: of the transient after the window may move a quantity by at most this fraction of the step time.
SETTLE_MAX_RATIO = 0.7
SETTLE_RATIO_TOL = 0.25
SETTLE_TOL = 1e-3


def _settling(v: list[Any], steps: float, what: str, floor: float) -> Any:
    """Value ``steps`` spacings past ``v[-1]`` for five values (module docstring, settling
    transients); affine when the last three are, geometric-settling otherwise; dicts key by key."""
    if isinstance(v[-1], dict):
        keys = sorted(set().union(*v))
        return {k: _settling([x.get(k, 0) for x in v], steps, f"{what}.{k}", floor) for k in keys}
    with suppress(_NotAffine):
        return _affine(v[-3], v[-2], v[-1], steps, what, floor)
    d = [b - a for a, b in zip(v, v[1:], strict=False)]
    e = [b - a for a, b in zip(d, d[1:], strict=False)]
    if not (all(x > 0 for x in e) or all(x < 0 for x in e)):
        raise _NotAffine(what)
    r1, r2 = e[1] / e[0], e[2] / e[1]
    if not (0 < r1 < SETTLE_MAX_RATIO and 0 < r2 < SETTLE_MAX_RATIO) or abs(r1 - r2) > SETTLE_RATIO_TOL * max(r1, r2):
        raise _NotAffine(what)
    rho = r2
    left = e[2] * rho / (1 - rho)  # d_inf - d_last: the sum of the second differences still to come
    d_inf = d[-1] + left
    # the transient still in d_last .. d_inf decays by rho per step: sum of what it adds beyond d_inf
    tail = -left * rho / (1 - rho) * (1 - rho ** steps) if steps > 0 else 0.0
    value = v[-1] + steps * d_inf + tail
    if abs(steps * left) > SETTLE_TOL * max(floor, abs(value), 1e-12):
        raise _NotAffine(what)
    return round(value) if isinstance(v[-1], int) and not isinstance(v[-1], bool) else value


def extrapolate_settling(rs: list[SimResult], spacing: int, steps_to_target: float,
                         tokens_per_step: int) -> SimResult | None:
    """Like :func:`extrapolate` from five evenly spaced results, accepting quantities that settle
    geometrically (module docstring); ``None`` when any quantity neither is affine nor settles."""
    if len(rs) != 5:
        return None
    return _extrapolated(rs, spacing, steps_to_target, tokens_per_step, _settling)


def _extrapolated(rs: list[SimResult], spacing: int, steps_to_target: float, tokens_per_step: int,
                  carry: Callable[[list[Any], float, str, float], Any]) -> SimResult | None:
    """Every additive quantity of the last result carried ``steps_to_target`` spacings on by ``carry``
    (which raises :class:`_NotAffine` to refuse); what must not change (class keys, memory peaks)
    must be equal over the last three results; MFU, HFU and tokens/s recomputed."""
    last = rs[-1]
    if len({len(r.classes) for r in rs}) != 1 or spacing <= 0 or len({r.peak_memory_bytes for r in rs[-3:]}) != 1:
        return None
    try:
        step = carry([r.step_time_s for r in rs], steps_to_target, "step_time_s", 0.0)
        classes = []
        for cs in zip(*(r.classes for r in rs), strict=True):
            for name in _CLASS_SAME:
                if len({repr(getattr(c, name)) for c in cs[-3:]}) != 1:
                    raise _NotAffine(name)
            kw = {f.name: getattr(cs[-1], f.name) for f in fields(ClassResult)}
            for name in _CLASS_LINEAR:
                floor = step if name.endswith("_s") else 0.0
                kw[name] = carry([getattr(c, name) for c in cs], steps_to_target, f"{cs[-1].class_key}.{name}", floor)
            # the per-label split is not additive; its inputs are: split the extrapolated total
            kw["exposed_comm_s"] = split_exposed(kw["exposed_comm_total_s"], kw["exposed_comm_raw_s"])
            kw["memory_peak_time_s"] = cs[-1].memory_peak_time_s
            classes.append(ClassResult(**kw))
        algos = carry([r.collective_algorithms for r in rs], steps_to_target, "collective_algorithms", 0.0)
    except _NotAffine:
        return None
    denom = step * last.world * last.peak_flops_per_device
    model = sum(c.ranks * c.model_flops for c in classes)
    executed = sum(c.ranks * c.executed_flops for c in classes)
    return replace(
        last, step_time_s=step, tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / step if step > 0 else 0.0,
        mfu=model / denom if denom > 0 else 0.0, hfu=executed / denom if denom > 0 else 0.0,
        classes=classes, collective_algorithms=algos,
    )


#: Steady-state extrapolation only when the step has at least this many times m3 micro-batches.
STEADY_MIN_FACTOR = 3
#: How many times the three-count window may move one spacing on when the check fails.
STEADY_SHIFTS = 2


def steady_counts(plan: ParallelPlan) -> tuple[int, int, int] | None:
    """Micro-batch counts ``m1 < m2 < m3`` past the pipeline warm-up to extrapolate from, or ``None``
    when the plan's step is small enough to simulate in full (fewer than :data:`STEADY_MIN_FACTOR`
    times ``m3`` micro-batches) or is not a training step."""
    if plan.phase != "train":
        return None
    spacing = plan.pp if plan.schedule == "interleaved" else 1
    k = plan.pp * plan.vpp
    m1 = -(-(k + 2) // spacing) * spacing  # margin: end stages settle a micro-batch or two late
    m3 = m1 + 2 * spacing
    if plan.microbatches < STEADY_MIN_FACTOR * (m3 + STEADY_SHIFTS * spacing) or (plan.microbatches - m3) % spacing:
        return None
    return m1, m1 + spacing, m3


def with_microbatches(plan: ParallelPlan, microbatches: int) -> ParallelPlan:
    """``plan`` with the global batch changed to give ``microbatches`` micro-batches per pipeline."""
    return plan.model_copy(update={"global_batch": microbatches * plan.dp * plan.micro_batch})


def simulate_steady(plan: ParallelPlan, run: Callable[[ParallelPlan], T],
                    result: Callable[[T], SimResult], workers: int = 1) -> tuple[SimResult, T, list[int]] | None:
    """Extrapolate ``plan``'s step from three short simulations, or ``None`` if it does not qualify
    (:func:`steady_counts`) or no window of three gives affine results.

    ``run(short_plan)`` simulates a plan with fewer micro-batches and returns whatever the caller
    keeps (``result`` extracts its :class:`SimResult`). Returns the extrapolated result, the last
    short run and the three micro-batch counts used. One driver for the CLI and the validation.
    ``workers > 1``: the first two short runs go to forked child processes while this process runs
    the third (:func:`_forked_results`; same results, less wall time on a multi-core machine).
    """
    start = steady_counts(plan)
    if start is None:
        return None
    spacing = start[1] - start[0]
    counts = list(start)
    plans = [with_microbatches(plan, m) for m in counts]
    if workers > 1 and _can_fork():
        with _forked_results([lambda p=p: result(run(p)) for p in plans[:-1]]) as collect:
            last = run(plans[-1])
            got = collect()
        # a child that died without a result (killed, out of memory, unpicklable error) is rerun here
        results = [r if r is not None else result(run(p)) for r, p in zip(got, plans[:-1], strict=True)]
        results.append(result(last))
    else:
        runs = [run(p) for p in plans]
        results = [result(r) for r in runs]
        last = runs[-1]
    tokens = plan.global_batch * plan.seq
    for shift in range(STEADY_SHIFTS + 1):  # a warm-up longer than expected: move the window on
        if shift:
            if not _settles(results):
                return None
            counts.append(counts[-1] + spacing)
            last = run(with_microbatches(plan, counts[-1]))
            results.append(result(last))
        res = extrapolate(*results[-3:], spacing, (plan.microbatches - counts[-1]) / spacing, tokens)
        if res is not None:
            return res, last, counts[-3:]
    res = extrapolate_settling(results[-5:], spacing, (plan.microbatches - counts[-1]) / spacing, tokens)
    if res is not None:
        return res, last, counts[-5:]
    return None


def _settles(results: list[SimResult]) -> bool:
    """Whether moving the window on can still help: the step time's second difference over the last
    window is smaller than over the one before (a warm-up transient dies out), or no window before
    it was seen. A drift that holds or grows (a pipeline of uneven stages in a cyclic regime: GPT-3
    175B, TP 8, PP 64, 1- and 2-layer stages) is not expected to pass the checks with one more short
    run, so the step is simulated in full at once: a cost decision. Where a later window would still
    have passed, the result is now the full simulation instead of an extrapolation within 1e-9 of it."""
    if len(results) < 4:
        return True
    t = [r.step_time_s for r in results[-4:]]
    before, now = abs(t[2] - 2 * t[1] + t[0]), abs(t[3] - 2 * t[2] + t[1])
    return now < before or now <= NOISE * abs(t[3])


def _can_fork() -> bool:
    """``os.fork`` exists (POSIX) and more than one CPU is ours to use."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return hasattr(os, "fork") and cpus > 1


@contextmanager
def _forked_results(jobs: list[Callable[[], SimResult]]) -> Iterator[Callable[[], list[SimResult | None]]]:
    """Run each job in a forked child (it inherits everything built so far: graphs, lowering caches),
    which sends its pickled result back over a pipe; the block gets ``collect()`` returning them in
    order (``None`` for a child that ended without one). A child's exception is re-raised here;
    leaving the block early (an error, Ctrl-C) kills the children. Children take the default SIGINT
    action, so a Ctrl-C ends them at once."""
    import os
    import pickle
    import signal

    procs: list[tuple[int, int]] = []
    for job in jobs:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: compute, send, leave without running the parent's cleanup
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.close(rfd)
                try:
                    payload = pickle.dumps((True, job()), protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
                    payload = pickle.dumps((False, exc))
                with os.fdopen(wfd, "wb") as out:
                    out.write(payload)
            except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        procs.append((pid, rfd))

    reaped: set[int] = set()

    def collect() -> list[SimResult | None]:
        out: list[SimResult | None] = []
        for pid, rfd in procs:
            with os.fdopen(rfd, "rb", closefd=False) as src:
                data = src.read()
            os.waitpid(pid, 0)
            reaped.add(pid)
            if not data:
                out.append(None)
                continue
            ok, value = pickle.loads(data)
            if not ok:
                raise value
            out.append(value)
        return out

    try:
        yield collect
    finally:
        for pid, rfd in procs:
            with suppress(OSError):
                os.close(rfd)
            if pid in reaped:  # never signal a reaped pid: the number may belong to someone else now
                continue
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
