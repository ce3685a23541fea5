"""The decision sink of the policy service: every served item or completion becomes a `Decision` in
the feedback log, through the group-commit `DecisionWriter` (off the request path). When its bounded
buffer is full, the call fails with RESOURCE_EXHAUSTED instead of serving answers that could never be
joined to feedback."""

from __future__ import annotations

import time

from loopserve import metrics
from loopserve.errors import ResourceExhausted
from loopserve.feedback_log import Decision, DecisionWriter
from policy_service.types import AnnotateCall, AnnotateResult, GenerateCall, GenerateResult

GENERATION_TASK = "generation"


class LoggedDecisions:
    def __init__(self, writer: DecisionWriter, task: str) -> None:
        self.writer = writer
        self.task = task

    def reserve(self, count: int) -> None:
        """Refuse up front when the buffer cannot take this request's decisions."""
        if self.writer.pending + count > self.writer.capacity:
            raise ResourceExhausted(
                f"decision log buffer full ({self.writer.pending} of {self.writer.capacity} pending); "
                "retry with back-off"
            )

    def record_annotations(self, call: AnnotateCall, result: AnnotateResult, client_id: str) -> None:
        now = time.time()
        decisions = [
            Decision(
                event_id=a.event_id,
                task=self.task,
                kind="label",
                input_text=text,
                output=tuple((lb.label, lb.score) for lb in a.labels),
                propensity=a.propensity,
                propensity_kind="prob",
                model="annotator",
                model_version=result.model_version,
                client_id=client_id,
                created=now,
                needs_review=a.needs_review,
            )
            for a, text in zip(result.annotations, call.texts, strict=True)
        ]
        self.writer.submit(decisions)
        metrics.DECISIONS_LOGGED.inc(len(decisions))
        metrics.QUEUE_DEPTH.labels("decisions").set(self.writer.pending)

    def record_completions(self, call: GenerateCall, result: GenerateResult, client_id: str) -> None:
        now = time.time()
        decisions = [
            Decision(
                event_id=c.event_id,
                task=GENERATION_TASK,
                kind="generation",
                input_text=call.prompt,
                output=c.text,
                propensity=c.sequence_logprob,
                propensity_kind="logprob",
                model="generator",
                model_version=result.model_version,
                client_id=client_id,
                created=now,
            )
            for c in result.completions
        ]
        self.writer.submit(decisions)
        metrics.DECISIONS_LOGGED.inc(len(decisions))
        metrics.QUEUE_DEPTH.labels("decisions").set(self.writer.pending)
