"""How much of a chunk's share of the budget a checked version's confident items take (`--top-up`).

Kept apart from loopserve.annotation.routing (numpy, scikit-learn) so the CLI's flag types import it at
start-up for nothing; the router calls `top_up_share` for each chunk."""

from __future__ import annotations

import math
from typing import Literal, get_args

TopUp = Literal["never", "stream-end", "always"]
TOP_UPS: tuple[TopUp, ...] = get_args(TopUp)


def top_up_share(
    mode: TopUp, left: int, chunk: int, flag_rate: float, items_left: int | None, budget_after: int
) -> int:
    """How many of the `left` interactions a chunk's flagged items leave go to confident items now.

    `stream-end`: the later chunks flag about `flag_rate * items_left` items and may spend `budget_after`
    on them; what they cannot absorb (the shortfall) is spread evenly over this chunk and the ones left, so
    a version's own confident items are not asked early for a share the stream would have spent later, and
    the budget is spent by the end. A stream that goes on (`items_left` None) absorbs everything."""
    if mode == "never" or left <= 0:
        return 0
    if mode == "always":
        return left
    if items_left is None:
        return 0
    shortfall = left + budget_after - math.floor(flag_rate * items_left)
    if shortfall <= 0:
        return 0
    return min(left, math.ceil(shortfall / (1 + math.ceil(items_left / max(chunk, 1)))))
