"""Argument checks shared by the router callbacks: errors that name the argument and the value it got."""

from __future__ import annotations

import numbers


def check_number(name: str, value: object, where: str = "") -> float:
    """``value`` as a float; a ``TypeError`` naming it when it is no real number (a YAML string, a bool).

    ``where`` says what the argument belongs to (e.g. ``"alarm rule 'churn'"``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}{name} must be a number, got {name}={value!r} of type {type(value).__name__}")
    return float(value)
