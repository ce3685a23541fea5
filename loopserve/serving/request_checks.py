"""Checks every service applies to what a client sends, with messages a person can act on."""

from __future__ import annotations

import math

from loopserve.errors import InvalidArgument

MAX_ID_CHARS = 256
"""Ids a client chooses (item ids), as the feedback log bounds its ids: echoed back, so bounded."""


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


def check_id(value: str, what: str, max_chars: int = MAX_ID_CHARS) -> None:
    if len(value) > max_chars:
        raise InvalidArgument(f"{what} has {len(value)} characters; the limit is {max_chars}")
