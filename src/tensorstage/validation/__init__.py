"""Validation against published training runs: ``tensorstage validate``.

:mod:`.cases` maps each case of ``public_cases.yaml`` to simulator inputs (model, plan, graph
conventions, system) and the number to compare; :mod:`.run` predicts it through ``lower`` + the
built-in simulator and summarises the errors (MAPE per group). See ``docs/calibration.md`` for
the efficiency parameters behind the predictions and the achieved accuracy.
"""

from tensorstage.validation.cases import Setup, Target, default_cases_path, load_targets, read_cases
from tensorstage.validation.run import CaseResult, Predictor, group_summary, report, run_targets

__all__ = [
    "CaseResult",
    "Predictor",
    "Setup",
    "Target",
    "default_cases_path",
    "group_summary",
    "load_targets",
    "read_cases",
    "report",
    "run_targets",
]
