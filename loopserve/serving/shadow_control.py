"""What the admin service needs from a shadow (no torch, no grpc): its evidence and its four verbs.

The implementation, which runs the candidate model, is policy_service/shadow.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class ShadowEvidence:
    """What a shadow candidate has shown on copies of live traffic (ids and counts, never text)."""

    candidate: str = ""
    """The candidate version; empty when no shadow runs."""
    serving: str = ""
    items: int = 0
    agreements: int = 0
    dropped: int = 0
    confidence_sum: float = 0.0
    serving_confidence_sum: float = 0.0
    promoted: str = ""
    pending: int = 0
    """Copies waiting for the candidate when this was read."""

    @property
    def agreement(self) -> float:
        return self.agreements / self.items if self.items else 0.0

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.items if self.items else 0.0

    @property
    def serving_mean_confidence(self) -> float:
        return self.serving_confidence_sum / self.items if self.items else 0.0


class ShadowControl(Protocol):
    model_name: str

    async def start(self, version: str) -> ShadowEvidence: ...

    def status(self) -> ShadowEvidence: ...

    async def promote(self) -> tuple[str, str]:
        """(previous serving version, the promoted one)."""
        ...

    async def stop(self) -> ShadowEvidence: ...
