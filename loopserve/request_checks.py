"""Checks every service applies to what a client sends, with messages a person can act on."""

from __future__ import annotations

import math

from loopserve.errors import InvalidArgument


def check_text(text: str, what: str, max_chars: int) -> None:
    """Refuse an empty (or blank) text and one over the configured size."""
    if not text or not text.strip():
        raise InvalidArgument(f"{what} is empty")
    if len(text) > max_chars:
        raise InvalidArgument(
            f"{what} has {len(text)} characters; the limit is {max_chars} "
            "(shorten or split the text, or raise --max-text-chars)"
        )


def check_finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return value
