"""Turn what a user typed for ``--model`` into a :class:`ModelSpec`.

One entry point for every command: a preset name (case-insensitive, aliases accepted), a Hugging
Face ``config.json`` (or a directory holding one), or a YAML file of explicit dimensions.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from tensorstage.errors import SpecError
from tensorstage.model.hf import load_hf_config
from tensorstage.model.presets import find_preset, list_presets, preset_aliases
from tensorstage.model.spec import ModelSpec
from tensorstage.model.yaml_model import load_yaml_model

_JSON = (".json",)
_YAML = (".yaml", ".yml")


def closest_presets(name: str, n: int = 5) -> list[str]:
    """Canonical preset names closest to ``name`` (aliases matched too), best first."""
    aliases = preset_aliases()
    matches = difflib.get_close_matches(name.strip().lower(), list(aliases), n=3 * n, cutoff=0.5)
    seen: list[str] = []
    for m in matches:
        canonical = aliases[m]
        if canonical not in seen:
            seen.append(canonical)
    return seen[:n]


def unknown_model_error(name: str) -> SpecError:
    """The one-line error for a name that is neither a preset nor a readable model file."""
    close = closest_presets(name)
    hint = f"closest presets: {', '.join(close)}" if close else f"presets: {', '.join(list_presets())}"
    return SpecError("model", f"unknown model {name!r}; {hint} (list all: tensorstage models)")


def resolve_model(name_or_path: str) -> ModelSpec:
    """A spec from a preset name, a ``.json`` HF config (or a directory with one) or a ``.yaml`` file."""
    text = str(name_or_path).strip()
    suffix = Path(text).suffix.lower()
    path = Path(text)
    if suffix in _JSON or suffix in _YAML:
        if not path.is_file():
            raise SpecError("model", f"file not found: {text}")
        return load_hf_config(path) if suffix in _JSON else load_yaml_model(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_config(path / "config.json", name=path.name)
    spec = find_preset(text)
    if spec is not None:
        return spec
    if path.is_file():  # a path, not a preset name: say what files are understood
        raise SpecError("model", f"{text} is neither a .json HF config nor a .yaml/.yml model file")
    if path.is_dir():
        raise SpecError("model", f"{text} is a directory without a config.json")
    raise unknown_model_error(text)
