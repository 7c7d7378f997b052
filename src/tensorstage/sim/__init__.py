"""Built-in simulator: run rank-class `Program`s on a system, get step time, MFU, breakdowns, memory.

Entry point: :func:`simulate`. Pieces: :mod:`.compute` (roofline), :mod:`.collectives` (alpha-beta
collective algorithms on a tiered fabric), :mod:`.machine` (system spec -> SI numbers),
:mod:`.engine` (event-driven execution), :mod:`.result` (summary), :mod:`.timeline` (Chrome trace).
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorstage.schedule.program import Program
from tensorstage.sim.engine import Execution, execute
from tensorstage.sim.machine import Machine, machine_from_system
from tensorstage.sim.result import ClassResult, SimResult, summarize

__all__ = ["ClassResult", "Execution", "Machine", "SimResult", "execute", "machine_from_system", "simulate",
           "summarize"]


def simulate(programs: Sequence[Program], mesh: object, system: object, *, dtype: str = "bf16",
             tokens_per_step: int = 0) -> SimResult:
    """Simulate one step of ``programs`` (one per rank class) lowered for ``mesh`` on ``system``.

    ``system`` is a ``hardware.SystemSpec`` (converted with :func:`machine_from_system` for
    ``dtype``) or a ready :class:`Machine`. ``tokens_per_step`` (global batch x sequence) gives
    ``tokens_per_s``.
    """
    machine = system if isinstance(system, Machine) else machine_from_system(system, dtype)
    return summarize(execute(programs, mesh, machine), tokens_per_step)
