"""Argument checks shared by the client's constructors: one clear ValueError naming the argument."""

from __future__ import annotations

__all__ = ["require_positive", "require_not_negative"]


def require_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def require_not_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
