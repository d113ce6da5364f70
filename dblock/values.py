"""Setting values checked for their type, one rule each, used wherever a setting is read.

A whole number is a real ``int`` (``True`` is an ``int`` to Python, never to a setting), and a
switch is a real ``bool`` (the string ``"maybe"`` or ``"off"`` is truthy, so it would run as
``true`` and be recorded as typed): anything else raises ``error`` (``ValueError`` by default)
with one line naming the setting, the value and what it must be.

Plain Python (imports nothing of dblock), so every layer can use it.
"""

from __future__ import annotations


def is_int(value) -> bool:
    """Whether ``value`` is a whole number: an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether ``value`` is a real number: an ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_int(name: str, value, low: int = 1, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an integer >= ``low``; else ``error`` naming ``name``."""
    if not is_int(value) or value < low:
        raise error(f"{name}={value!r} is not allowed: {name} must be an integer >= {low}")
    return value


def boolean(name: str, value, error: type[Exception] = ValueError) -> bool:
    """``value`` if it is ``True`` or ``False``; else ``error`` naming ``name``."""
    if not isinstance(value, bool):
        raise error(
            f"{name}={value!r} is not allowed: {name} is a switch, give {name}=true or "
            f"{name}=false"
        )
    return value
