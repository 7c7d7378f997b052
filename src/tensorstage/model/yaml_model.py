"""Read a model described in a YAML file with explicit dimensions.

Why: models that are neither presets nor HF checkpoints (a design under study, a paper's table)
should be one small reviewable file. The file holds :class:`ModelSpec` fields at the top level;
``name`` defaults to the file's stem. Every problem is a one-line :class:`SpecError` naming the
file and the line (bad YAML) or the field (bad value).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tensorstage.errors import SpecError
from tensorstage.fileio import read_text_file
from tensorstage.model.spec import ModelSpec


def read_yaml_mapping(path: str | Path) -> dict:
    """Parse ``path`` as a YAML mapping; syntax errors become one line with file and line number."""
    p = Path(path)
    text = read_text_file(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(where, f"invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(str(p), "expected a mapping of model fields at the top level")
    return data


def load_yaml_model(path: str | Path) -> ModelSpec:
    """A :class:`ModelSpec` from a YAML file of explicit dimensions."""
    p = Path(path)
    data = read_yaml_mapping(p)
    data.setdefault("name", p.stem)
    data.setdefault("source", str(p))
    return ModelSpec.parse(data, where=str(p))
