"""Turn a pydantic ``ValidationError`` into one :class:`SpecError` naming the offending field.

Field-level errors carry their location; checks in a ``model_validator`` stop at the model, so
those validators write their message as ``"<field>: <reason>"`` and the field is taken from it.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from tensorstage.errors import SpecError

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)


def spec_error(exc: ValidationError, where: str) -> SpecError:
    """First pydantic error as a one-line :class:`SpecError` with a dotted field path under ``where``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    match = _FIELD_PREFIX.match(msg) if err.get("type") == "value_error" else None
    if match:
        loc, msg = ".".join(p for p in (loc, match.group(1)) if p), match.group(2)
    allowed = None
    ctx = err.get("ctx") or {}
    if err.get("type") == "literal_error" and "expected" in ctx:
        allowed = [a.strip().strip("'") for a in re.split(r",| or ", str(ctx["expected"])) if a.strip()]
        msg = "not an allowed value"
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    field = f"{where}.{loc}" if loc else where
    return SpecError(field, " ".join(msg.split()), allowed)
