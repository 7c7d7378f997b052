"""Loading device presets (``presets.yaml``) and user device files, with helpful name errors.

A name is looked up case-insensitively among preset names and their aliases; an argument that
names an existing ``.yaml``/``.yml`` file is read as one device mapping instead. Unknown names raise
:class:`SpecError` listing the closest preset names (``difflib``), so a typo costs one retry.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tensorstage.errors import SpecError
from tensorstage.fileio import read_text_file
from tensorstage.hardware.device import DeviceSpec

PRESETS_FILE = "presets.yaml"


def read_yaml(path: Path, field: str) -> Any:
    """Parse a YAML file; unreadable or malformed files become a one-line :class:`SpecError` on ``field``."""
    if path.exists():  # through the one reader: binary and huge files, the same message everywhere
        text = read_text_file(path, f"{field} file")
    else:
        raise SpecError(field, f"cannot read {path}: No such file or directory")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError(field, f"{path} is not valid YAML{at}") from None


def read_packaged_yaml(filename: str) -> Any:
    """Parse a YAML file shipped inside ``tensorstage.hardware``."""
    text = resources.files("tensorstage.hardware").joinpath(filename).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def looks_like_path(arg: str | Path) -> bool:
    """True when ``arg`` should be read as a file rather than looked up as a preset name."""
    if isinstance(arg, Path):
        return True
    return arg.endswith((".yaml", ".yml")) or "/" in arg or Path(arg).is_file()


def unknown_name_error(field: str, kind: str, name: str, names: list[str]) -> SpecError:
    """A :class:`SpecError` for an unknown preset name that suggests the closest known names."""
    lowered = {n.lower(): n for n in names}
    prefixed = [n for n in names if n.lower().startswith(name.lower())] if name else []
    fuzzy = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.4)]
    close = list(dict.fromkeys(prefixed + fuzzy))[:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return SpecError(field, f"unknown {kind} {name!r}{hint}", allowed=names)


@cache
def _device_table() -> dict[str, DeviceSpec]:
    """Preset devices by name, in file order (validated once per process)."""
    data = read_packaged_yaml(PRESETS_FILE)
    table: dict[str, DeviceSpec] = {}
    for i, entry in enumerate(data["devices"]):
        spec = DeviceSpec.parse(entry, where=f"presets.devices[{i}]")
        table[spec.name] = spec
    return table


@cache
def _device_lookup() -> dict[str, str]:
    """Lower-cased name or alias -> preset name."""
    lookup: dict[str, str] = {}
    for spec in _device_table().values():
        for key in (spec.name, *spec.aliases):
            if key.lower() in lookup and lookup[key.lower()] != spec.name:
                raise ValueError(f"device alias {key!r} is used by two presets")
            lookup[key.lower()] = spec.name
    return lookup


def device_names() -> list[str]:
    """Preset device names in file order."""
    return list(_device_table())


def all_devices() -> list[DeviceSpec]:
    """All preset devices in file order."""
    return list(_device_table().values())


def load_device(name_or_path: str | Path, field: str = "device") -> DeviceSpec:
    """A preset device by name or alias (case-insensitive), or a device read from a YAML file."""
    if looks_like_path(name_or_path):
        data = read_yaml(Path(name_or_path), field)
        if not isinstance(data, dict):
            raise SpecError(field, f"{name_or_path} must hold a mapping of device fields")
        return DeviceSpec.parse(data, where=field)
    name_or_path = str(name_or_path)
    key = _device_lookup().get(name_or_path.lower())
    if key is None:
        raise unknown_name_error(field, "device", name_or_path, device_names())
    return _device_table()[key]
