"""Domain types of the reward service, with validation and `from_pb` / `to_pb`.

Validation lives here (not in the servicer): a bad request raises InvalidArgument with a message a
person can act on, before anything is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loopserve.errors import InvalidArgument
from loopserve.models.reward_format import DEFAULT_CLIP, MAX_CLIP, RewardStats
from loopserve.reward.v1 import reward_pb2 as pb
from loopserve.serving.request_checks import check_text


@dataclass(frozen=True)
class Limits:
    max_pairs_per_request: int
    max_text_chars: int


def _check_text(text: str, what: str, limits: Limits) -> None:
    check_text(text, what, limits.max_text_chars)


def preference_probability(score_a: float, score_b: float) -> float:
    """Bradley-Terry: P(a preferred over b) = sigmoid(r_a - r_b), computed without overflow."""
    d = score_a - score_b
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


# ---- Score ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreCall:
    """(prompt, response) pairs to score; what the batcher queues and the runtime runs."""

    pairs: tuple[tuple[str, str], ...]
    normalised: bool = False
    """Return (r - mean) / std of the scoring version's reference statistics, clipped to +-clip."""
    clip: float = DEFAULT_CLIP

    @classmethod
    def from_pb(cls, req: pb.ScoreRequest, limits: Limits) -> ScoreCall:
        if not req.pairs:
            raise InvalidArgument("pairs is empty: send at least one (prompt, response) pair")
        if len(req.pairs) > limits.max_pairs_per_request:
            raise InvalidArgument(
                f"{len(req.pairs)} pairs in one request; the limit is {limits.max_pairs_per_request} "
                "(split the batch, or raise --max-pairs-per-request)"
            )
        for i, pair in enumerate(req.pairs):
            _check_text(pair.prompt, f"pairs[{i}].prompt", limits)
            _check_text(pair.response, f"pairs[{i}].response", limits)
        if req.scale not in (pb.REWARD_SCALE_RAW, pb.REWARD_SCALE_NORMALISED):
            raise InvalidArgument(f"scale {req.scale} is not a RewardScale (0 raw, 1 normalised)")
        clip = float(req.clip)
        if not math.isfinite(clip) or clip < 0 or clip > MAX_CLIP:
            raise InvalidArgument(f"clip must be 0 (the default, {DEFAULT_CLIP}) or in (0, {MAX_CLIP:g}]")
        return cls(
            pairs=tuple((p.prompt, p.response) for p in req.pairs),
            normalised=req.scale == pb.REWARD_SCALE_NORMALISED,
            clip=clip or DEFAULT_CLIP,
        )


@dataclass(frozen=True)
class ScoreResult:
    model_version: str
    scores: tuple[float, ...]  # one per pair, in request order
    normalised: bool = False
    clip: float = 0.0
    """The range [-clip, clip] normalised scores were clipped to (0 for raw scores)."""
    stats: RewardStats | None = None

    @classmethod
    def of(cls, model_version: str, raw: list[float], call: ScoreCall, stats: RewardStats) -> ScoreResult:
        """The result of `call` from its raw rewards, on the scale it asked for."""
        if not call.normalised:
            return cls(model_version, tuple(raw), stats=stats)
        return cls(model_version, stats.normalise(raw, call.clip), True, call.clip, stats)

    def to_pb(self) -> pb.ScoreResponse:
        return pb.ScoreResponse(
            model_version=self.model_version,
            scores=list(self.scores),
            scale=pb.REWARD_SCALE_NORMALISED if self.normalised else pb.REWARD_SCALE_RAW,
            clip=self.clip,
            reference_mean=self.stats.mean if self.stats else 0.0,
            reference_std=self.stats.std if self.stats else 0.0,
        )


# ---- Compare ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareCall:
    prompt: str
    a: str
    b: str

    @classmethod
    def from_pb(cls, req: pb.CompareRequest, limits: Limits) -> CompareCall:
        _check_text(req.prompt, "prompt", limits)
        _check_text(req.a, "a (the first response)", limits)
        _check_text(req.b, "b (the second response)", limits)
        return cls(prompt=req.prompt, a=req.a, b=req.b)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The two pairs it scores, so a Compare rides in the same batches as Score calls."""
        return ((self.prompt, self.a), (self.prompt, self.b))


@dataclass(frozen=True)
class CompareResult:
    model_version: str
    p_a_preferred: float
    score_a: float
    score_b: float

    @classmethod
    def from_scores(cls, model_version: str, score_a: float, score_b: float) -> CompareResult:
        return cls(model_version, preference_probability(score_a, score_b), score_a, score_b)

    def to_pb(self) -> pb.CompareResponse:
        return pb.CompareResponse(
            model_version=self.model_version,
            p_a_preferred=self.p_a_preferred,
            score_a=self.score_a,
            score_b=self.score_b,
        )


# ---- GetModelInfo -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    model_version: str
    limits: Limits
    max_input_tokens: int
    device: str
    dtype: str

    def to_pb(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            model_version=self.model_version,
            max_pairs_per_request=self.limits.max_pairs_per_request,
            max_text_chars=self.limits.max_text_chars,
            max_input_tokens=self.max_input_tokens,
            device=self.device,
            dtype=self.dtype,
        )
