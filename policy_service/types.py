"""Domain types of the policy service, with validation and `from_pb` / `to_pb`.

Validation lives here (not in the servicer): a bad request raises InvalidArgument with a message a
person can act on, before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loopserve.errors import InvalidArgument, quote
from loopserve.policy.v1 import policy_pb2 as pb
from loopserve.serving.request_checks import check_finite, check_id, check_text

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class Limits:
    max_items_per_request: int
    max_text_chars: int
    max_new_tokens_default: int
    max_new_tokens_cap: int
    max_completions: int


def _check_text(text: str, what: str, limits: Limits) -> None:
    check_text(text, what, limits.max_text_chars)


# ---- Annotate ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotateCall:
    task: str
    item_ids: tuple[str, ...]
    texts: tuple[str, ...]
    top_k: int

    @classmethod
    def from_pb(cls, req: pb.AnnotateRequest, limits: Limits, default_task: str) -> AnnotateCall:
        task = req.task or default_task
        if task != default_task:
            raise InvalidArgument(f"unknown task {quote(req.task)}; this service serves task {default_task!r}")
        if not req.items:
            raise InvalidArgument("items is empty: send at least one item")
        if len(req.items) > limits.max_items_per_request:
            raise InvalidArgument(
                f"{len(req.items)} items in one request; the limit is {limits.max_items_per_request} (split the batch)"
            )
        if req.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {req.top_k}")
        for i, item in enumerate(req.items):
            check_id(item.id, f"items[{i}].id")
            _check_text(item.text, f"items[{i}].text (id {quote(item.id)})", limits)
        return cls(
            task=task,
            item_ids=tuple(item.id for item in req.items),
            texts=tuple(item.text for item in req.items),
            top_k=req.top_k,
        )


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Annotation:
    item_id: str
    event_id: str
    labels: tuple[LabelScore, ...]  # the served label first, then the rest best first
    needs_review: bool
    truncated: bool
    propensity: float
    """Probability with which the served label (labels[0]) was chosen under the task's exploration rule
    (policy_service/exploration.py): 1 when it serves the argmax deterministically (for off-policy
    learning and evaluation)."""

    def to_pb(self) -> pb.Annotation:
        return pb.Annotation(
            item_id=self.item_id,
            event_id=self.event_id,
            needs_review=self.needs_review,
            truncated=self.truncated,
            labels=[pb.LabelScore(label=lb.label, score=lb.score) for lb in self.labels],
        )


@dataclass(frozen=True)
class AnnotateResult:
    model_version: str
    annotations: tuple[Annotation, ...]

    def to_pb(self) -> pb.AnnotateResponse:
        return pb.AnnotateResponse(model_version=self.model_version, annotations=[a.to_pb() for a in self.annotations])


# ---- Generate ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False


@dataclass(frozen=True)
class GenerateCall:
    prompt: str
    n: int
    raw_prompt: bool
    params: SamplingParams

    @classmethod
    def from_pb(cls, req: pb.GenerateRequest, limits: Limits, *, stream: bool = False) -> GenerateCall:
        _check_text(req.prompt, "prompt", limits)
        if req.max_new_tokens < 0 or req.max_new_tokens > limits.max_new_tokens_cap:
            raise InvalidArgument(
                f"max_new_tokens must be in [1, {limits.max_new_tokens_cap}] (0 means the default "
                f"{limits.max_new_tokens_default}), got {req.max_new_tokens}"
            )
        temperature = check_finite(req.temperature, "temperature") if req.HasField("temperature") else 1.0
        if temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        top_p = check_finite(req.top_p, "top_p") if req.HasField("top_p") else 1.0
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        if req.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 turns it off), got {req.top_k}")
        n = req.n or 1
        if n < 0 or n > limits.max_completions:
            raise InvalidArgument(f"n must be in [1, {limits.max_completions}], got {req.n}")
        if stream and n != 1:
            raise InvalidArgument("GenerateStream streams one completion: n must be 0 or 1")
        if len(req.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(req.stop)}")
        for s in req.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise InvalidArgument(f"a stop string must have 1 to {MAX_STOP_CHARS} characters")
        return cls(
            prompt=req.prompt,
            n=n,
            raw_prompt=req.raw_prompt,
            params=SamplingParams(
                max_new_tokens=req.max_new_tokens or limits.max_new_tokens_default,
                temperature=temperature,
                top_p=top_p,
                top_k=req.top_k,
                seed=req.seed if req.HasField("seed") else None,
                stop=tuple(req.stop),
                logprobs=req.logprobs,
            ),
        )


@dataclass(frozen=True)
class Completion:
    text: str
    event_id: str
    num_tokens: int
    finish_reason: str
    sequence_logprob: float
    token_logprobs: tuple[float, ...] = ()

    def to_pb(self) -> pb.Completion:
        return pb.Completion(
            text=self.text,
            event_id=self.event_id,
            num_tokens=self.num_tokens,
            finish_reason=self.finish_reason,
            sequence_logprob=self.sequence_logprob,
            token_logprobs=list(self.token_logprobs),
        )


@dataclass(frozen=True)
class GenerateResult:
    model_version: str
    completions: tuple[Completion, ...]

    def to_pb(self) -> pb.GenerateResponse:
        return pb.GenerateResponse(model_version=self.model_version, completions=[c.to_pb() for c in self.completions])


@dataclass(frozen=True)
class TokenDelta:
    """One step of a streamed completion."""

    text: str
    logprob: float
    done: bool = False
    finish_reason: str = ""
    num_tokens: int = 0


@dataclass
class ModelInfo:
    task: str
    labels: list[tuple[str, str]]
    annotator_version: str
    generator_version: str
    limits: Limits
    max_input_tokens: int
    review_threshold: float
    device: str
    dtype: str
    extra: dict[str, str] = field(default_factory=dict)

    def to_pb(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            task=self.task,
            labels=[pb.LabelInfo(name=n, description=d) for n, d in self.labels],
            annotator_version=self.annotator_version,
            generator_version=self.generator_version,
            max_items_per_request=self.limits.max_items_per_request,
            max_text_chars=self.limits.max_text_chars,
            max_new_tokens_cap=self.limits.max_new_tokens_cap,
            max_input_tokens=self.max_input_tokens,
            review_threshold=self.review_threshold,
            device=self.device,
            dtype=self.dtype,
        )
