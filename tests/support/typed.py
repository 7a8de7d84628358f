"""A value with the type of every part spelled out, to compare results of two computations exactly."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any


def typed(value: Any) -> Any:
    """``value`` with the type of every part spelled out, so that ``1 == 1.0`` and ``() == []`` differ.

    Dataclass instances (a ``Baseline``, a ``PendingFact``) become their class name and fields.
    """
    if is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, [(f.name, typed(getattr(value, f.name))) for f in fields(value)])
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    return (type(value).__name__, value)
