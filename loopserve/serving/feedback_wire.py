"""FeedbackService wire conversions: protobuf events to `Feedback` records and results back.

Shared by the grpc.aio servicer and the Ray deployment. Shape errors (no kind set) are reported per
event, like every other rejection, so one bad event never sinks its batch.
"""

from __future__ import annotations

from loopserve.errors import InvalidArgument, cap_message
from loopserve.feedback.v1 import feedback_pb2 as pb
from loopserve.feedback_log.records import Feedback, FeedbackResult
from loopserve.feedback_log.validation import MAX_ID_CHARS

NO_KIND = "the event has no kind: set one of accept, reject, correction, rating, preference, edit"


def feedback_from_pb(event: pb.FeedbackEvent) -> Feedback:
    kind = event.WhichOneof("kind")
    key, who = event.idempotency_key, event.annotator_id
    if kind in ("accept", "reject", "correction"):  # the three verdicts on a served label share a shape
        verdict = getattr(event, kind)
        return Feedback(
            kind=kind, event_id=verdict.event_id, label=verdict.label, idempotency_key=key, annotator_id=who
        )
    if kind == "rating":
        r = event.rating
        return Feedback(
            kind="rating",
            event_id=r.event_id,
            value=r.value,
            scale_min=r.scale_min,
            scale_max=r.scale_max,
            idempotency_key=key,
            annotator_id=who,
        )
    if kind == "preference":
        p = event.preference
        return Feedback(
            kind="preference",
            chosen_event_id=p.chosen_event_id,
            rejected_event_id=p.rejected_event_id,
            prompt=p.prompt,
            chosen=p.chosen,
            rejected=p.rejected,
            idempotency_key=key,
            annotator_id=who,
        )
    if kind == "edit":
        return Feedback(
            kind="edit", event_id=event.edit.event_id, text=event.edit.text, idempotency_key=key, annotator_id=who
        )
    raise InvalidArgument(NO_KIND)


def result_to_pb(r: FeedbackResult) -> pb.EventResult:
    return pb.EventResult(
        index=r.index,
        # Cut to the longest valid key: a result never echoes an oversize key back whole.
        idempotency_key=r.idempotency_key[:MAX_ID_CHARS],
        accepted=r.accepted,
        duplicate=r.duplicate,
        code=r.code,
        reason=cap_message(r.reason),
        seq=r.seq,
    )


def rejected(index: int, event: pb.FeedbackEvent, code: str, reason: str) -> FeedbackResult:
    return FeedbackResult(index=index, idempotency_key=event.idempotency_key, accepted=False, code=code, reason=reason)
