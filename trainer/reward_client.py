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
from loopserve.models.reward_format import DEFAULT_CLIP


class ServiceReward:
    """`normalised`: ask for (r - mean) / std of the scoring version's reference statistics, clipped to
    [-clip, clip] (the trainer's default), so every reward version speaks on one scale."""

    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        timeout_s: float = 60.0,
        max_pairs_per_request: int = 256,
        root_certificates: Path | None = None,
        normalised: bool = False,
        clip: float = 0.0,
    ) -> None:
        self.client = Client(target, token, timeout_s=timeout_s, root_certificates=root_certificates)
        self.timeout_s = timeout_s
        self.max_pairs = max_pairs_per_request
        self.normalised, self.clip = normalised, clip or (DEFAULT_CLIP if normalised else 0.0)
        self.versions: list[str] = []
        """The reward version that scored each call, in order (for the round's record)."""

    @classmethod
    def from_token_file(cls, target: str, token_file: Path, **kw: float | int | bool | Path | None) -> ServiceReward:
        token = read_token(token_file, "client") if token_file.is_file() else None
        return cls(target, token, **kw)  # type: ignore[arg-type]

    def __call__(self, pairs: Sequence[tuple[str, str]], /) -> list[float]:
        """One reward per pair. A sampled completion can be empty (EOS first), which the service refuses
        as a response: those are not sent, and score the bottom of the range instead (-clip when
        normalised, else the lowest reward of the call): an empty answer is no answer."""
        sent = [i for i, (_, response) in enumerate(pairs) if response.strip()]
        scores: list[float] = []
        for start in range(0, len(sent), self.max_pairs):
            chunk = [pairs[i] for i in sent[start : start + self.max_pairs]]
            resp = self.client.score(chunk, timeout_s=self.timeout_s, normalised=self.normalised, clip=self.clip)
            scores.extend(resp.scores)
            self.versions.append(resp.model_version)
        del self.versions[:-1000]
        if len(sent) == len(pairs):
            return scores
        floor = -self.clip if self.normalised else min(scores, default=0.0)
        out = [floor] * len(pairs)
        for i, value in zip(sent, scores, strict=True):
            out[i] = value
        return out

    def close(self) -> None:
        self.client.close()
