"""A `RewardFn` over the reward service's Score RPC (the trainer's production reward function).

Chunks requests to the service's `max_pairs_per_request`; `loopserve.client.Client` retries
UNAVAILABLE / RESOURCE_EXHAUSTED with back-off, and whatever still fails surfaces as an exception that
`generation_rl.score` turns into `RewardUnavailable` (the loop then defers the generator's round).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loopserve.auth import read_token
from loopserve.client import Client


class ServiceReward:
    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        timeout_s: float = 60.0,
        max_pairs_per_request: int = 256,
        root_certificates: Path | None = None,
    ) -> None:
        self.client = Client(target, token, timeout_s=timeout_s, root_certificates=root_certificates)
        self.timeout_s = timeout_s
        self.max_pairs = max_pairs_per_request

    @classmethod
    def from_token_file(cls, target: str, token_file: Path, **kw: float | int | Path | None) -> ServiceReward:
        token = read_token(token_file, "client") if token_file.is_file() else None
        return cls(target, token, **kw)  # type: ignore[arg-type]

    def __call__(self, pairs: Sequence[tuple[str, str]], /) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(pairs), self.max_pairs):
            resp = self.client.score(list(pairs[i : i + self.max_pairs]), timeout_s=self.timeout_s)
            scores.extend(resp.scores)
        return scores

    def close(self) -> None:
        self.client.close()
