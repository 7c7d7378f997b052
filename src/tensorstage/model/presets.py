"""Built-in model presets, loaded from the bundled ``presets.yaml``.

Why a data file: every preset is a set of published dimensions with a source; keeping them as
data (not code) makes each one reviewable against its paper or ``config.json`` line by line.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from tensorstage.errors import SpecError
from tensorstage.model.spec import ModelSpec

_PRESET_FILE = "presets.yaml"


@cache
def _load() -> tuple[dict[str, ModelSpec], dict[str, str]]:
    """Parse the preset file once: specs by canonical name, and lower-case name/alias -> name."""
    text = resources.files("tensorstage.model").joinpath(_PRESET_FILE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    specs: dict[str, ModelSpec] = {}
    lookup: dict[str, str] = {}
    for entry in data["presets"]:
        entry = dict(entry)
        aliases = entry.pop("aliases", [])
        spec = ModelSpec.parse(entry, where=f"presets.yaml:{entry.get('name', '?')}")
        if not spec.source:
            raise SpecError(f"presets.yaml:{spec.name}.source", "every preset needs a source")
        for key in (spec.name, *aliases):
            if key.lower() in lookup:
                raise SpecError(f"presets.yaml:{spec.name}", f"duplicate preset name or alias {key!r}")
            lookup[key.lower()] = spec.name
        specs[spec.name] = spec
    return specs, lookup


def list_presets() -> list[str]:
    """Canonical preset names in file order (grouped by family)."""
    return list(_load()[0])


def preset_aliases() -> dict[str, str]:
    """Every accepted lower-case name or alias -> canonical preset name."""
    return dict(_load()[1])


def find_preset(name: str) -> ModelSpec | None:
    """The preset called ``name`` (case-insensitive, aliases accepted), or None."""
    specs, lookup = _load()
    canonical = lookup.get(name.strip().lower())
    return specs[canonical] if canonical else None


def get_preset(name: str) -> ModelSpec:
    """The preset called ``name``; unknown names raise :class:`SpecError` listing the closest ones."""
    spec = find_preset(name)
    if spec is None:
        from tensorstage.model.resolve import unknown_model_error

        raise unknown_model_error(name)
    return spec
