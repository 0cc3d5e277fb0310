"""The library's environment variables, read with one rule each: a switch is 0 or 1, a number lies in its range,
a name is one of its choices; unset (or empty) means the default. Anything else is a ValueError that names the
variable, what it allows and the value given, rather than a silent fallback (``FLATQUANT_PDL=off`` would
otherwise have meant "on" in one place and "off" in another).

The variables and their defaults are listed in the README ("Environment switches").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

__all__ = ["choice", "number", "switch"]


def _raw(name: str) -> str | None:
    raw = os.environ.get(name)
    return None if raw is None or raw == "" else raw


def switch(name: str, default: bool, off: str, on: str) -> bool:
    """The 0/1 variable ``name`` (``default`` when unset); ``off`` / ``on`` say what 0 and 1 do (for the error)."""
    raw = _raw(name)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        marks = (", the default" if not default else "", ", the default" if default else "")
        raise ValueError(f"{name} must be 0 ({off}{marks[0]}) or 1 ({on}{marks[1]}), got {raw!r}")
    return raw == "1"


def number(name: str, default, cast: Callable, lo, hi, what: str):
    """``cast`` of the variable ``name`` (``default`` when unset), which must lie in [lo, hi]; ``what`` names the
    kind of value for the error ("an integer", "a fraction of the L2 cache")."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name} must be {what} in [{lo}, {hi}], got {raw!r}")
    return value


def choice(name: str, default: str, allowed: Sequence[str]) -> str:
    """The variable ``name`` (``default`` when unset), one of ``allowed``."""
    raw = _raw(name)
    if raw is None:
        return default
    if raw not in allowed:
        options = ", ".join(repr(a) + (" (the default)" if a == default else "") for a in allowed)
        raise ValueError(f"{name} must be one of {options}, got {raw!r}")
    return raw
