"""The policy service's side of the feedback log: the decision sink (every served item or completion
becomes a `Decision`, through the group-commit `DecisionWriter`, off the request path; when its bounded
buffer is full the call fails with RESOURCE_EXHAUSTED instead of serving answers that could never be
joined to feedback), and `PolicyLog`, which opens the log with that sink and FeedbackService's logic
for a process (the grpc.aio app or one Ray replica)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from loopserve import metrics
from loopserve.config import PolicyConfig
from loopserve.errors import ResourceExhausted
from loopserve.feedback_log import Decision, DecisionWriter, FeedbackCommitter, open_feedback_log
from loopserve.feedback_log.commit_process import ProcessCommitter
from loopserve.serving.feedback import FeedbackIngest, FeedbackServicer
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


class PolicyLog:
    """The feedback log as one policy process uses it: decisions go out through `decisions` (None with
    `log_decisions` off), feedback comes in through `servicer` (acknowledged once durable; checked
    against `label_set()`, the serving annotator's labels). Replicas on several nodes need PostgreSQL."""

    def __init__(self, cfg: PolicyConfig, label_set: Callable[[], Collection[str]]) -> None:
        self.log = open_feedback_log(cfg.feedback_log_url)
        self.writer = DecisionWriter(self.log, capacity=cfg.decision_buffer)
        self.committer = (
            ProcessCommitter(cfg.feedback_log_url, decisions=self.writer)
            if cfg.ingest_process
            else FeedbackCommitter(self.log, decisions=self.writer)
        )
        self.decisions = LoggedDecisions(self.writer, cfg.task) if cfg.log_decisions else None
        self.servicer = FeedbackServicer(FeedbackIngest(self.committer, lambda: {cfg.task: label_set()}))
        # Read at scrape time: the writer drains its buffer off the request path, so a value set when
        # a request queued decisions would stay stale (at 1) once the stack is idle.
        writer, committer = self.writer, self.committer
        metrics.QUEUE_DEPTH.labels("decisions").set_function(lambda: writer.pending)
        metrics.QUEUE_DEPTH.labels("feedback").set_function(lambda: committer.pending)

    def close(self) -> None:
        """Everything acknowledged is already durable; this writes the decisions still buffered."""
        self.committer.close()
        self.writer.close()
        self.log.close()
