"""PyTorch ground truth for tensorstage's trace generator: what collectives torch actually issues per rank.

See ``README.md`` in this folder. Entry points: ``run_ddp``, ``run_fsdp2``, ``run_tp``, ``run_pp``,
``run_ep``, ``run_manual`` (one world each) and ``run_many`` (several scenarios in one world).
"""

from .recorder import CommRecord, CommRecorder, aggregate, group_key
from .runners import run_ddp, run_ep, run_fsdp2, run_manual, run_many, run_pp, run_tp
from .world import SCENARIOS, run_world

__all__ = [
    "SCENARIOS", "CommRecord", "CommRecorder", "aggregate", "group_key", "run_ddp", "run_ep", "run_fsdp2",
    "run_manual", "run_many", "run_pp", "run_tp", "run_world",
]
