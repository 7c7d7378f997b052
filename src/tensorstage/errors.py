"""Errors raised for bad user input.

Every user-facing input problem is a :class:`SpecError` that names the offending field and,
where it helps, the allowed values. The CLI turns it into one line on stderr and exit code 2,
so no traceback and no partial output ever reaches the user.
"""

from __future__ import annotations

from collections.abc import Iterable


class SpecError(ValueError):
    """Invalid user input: a field (dotted path) and a human-readable reason."""

    def __init__(self, field: str, message: str, allowed: Iterable[object] | None = None) -> None:
        self.field = field
        self.reason = message
        self.allowed = tuple(allowed) if allowed is not None else None
        text = f"{field}: {message}"
        if self.allowed:
            text += f" (allowed: {', '.join(str(a) for a in self.allowed)})"
        super().__init__(text)


def require(condition: bool, field: str, message: str, allowed: Iterable[object] | None = None) -> None:
    """Raise :class:`SpecError` unless ``condition`` holds."""
    if not condition:
        raise SpecError(field, message, allowed)


class InputWarning(UserWarning):
    """Input that is legal but probably not what the user meant (a sequence longer than the model
    was trained for, ...). The CLI prints it as one ``warning: ...`` line on stderr and goes on."""
