"""FeedbackService (hosted by the policy service process): acknowledge feedback once it is durable.

`Submit` answers per event; when no event of the batch is accepted, the call fails with the first
rejection's status, so a single-event caller gets plain gRPC semantics (NOT_FOUND for an unknown
event_id, ...) and a batch caller still sees every reason. `SubmitStream` commits while it reads (up
to `MAX_INFLIGHT` chunks in flight, the back-pressure) and answers with a summary at the end: what the
summary counts as accepted is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from grpc import aio

from loopserve import metrics
from loopserve.errors import LoopserveError, quote
from loopserve.feedback.v1 import feedback_pb2 as pb
from loopserve.feedback.v1 import feedback_pb2_grpc
from loopserve.feedback_log import FeedbackCommitter, LabelSets
from loopserve.feedback_log.records import Feedback, FeedbackResult
from loopserve.feedback_types import feedback_from_pb, rejected, result_to_pb

MAX_EVENTS_PER_SUBMIT = 10_000
STREAM_CHUNK = 2_000
MAX_INFLIGHT = 8
MAX_REJECTIONS_REPORTED = 100


def _error(code: str, reason: str) -> LoopserveError:
    """A domain error carrying a status code name chosen at run time (the first rejection's)."""
    err = LoopserveError(reason)
    err.code = code
    return err


class FeedbackIngest:
    """Plain async logic (no grpc): convert, commit through the group committer, count."""

    def __init__(self, committer: FeedbackCommitter, label_sets: Callable[[], LabelSets]) -> None:
        self.committer = committer
        self.label_sets = label_sets

    async def commit(self, events: Sequence[pb.FeedbackEvent], offset: int = 0) -> list[FeedbackResult]:
        results: dict[int, FeedbackResult] = {}
        records: list[Feedback] = []
        where: list[int] = []
        for i, ev in enumerate(events):
            try:
                records.append(feedback_from_pb(ev))
                where.append(i)
            except LoopserveError as e:
                results[i] = rejected(offset + i, ev, e.code, e.message)
        if records:
            committed = await asyncio.wrap_future(self.committer.submit(records, self.label_sets()))
            for i, r in zip(where, committed, strict=True):
                results[i] = FeedbackResult(
                    index=offset + i,
                    idempotency_key=r.idempotency_key,
                    accepted=r.accepted,
                    duplicate=r.duplicate,
                    code=r.code,
                    reason=r.reason,
                    seq=r.seq,
                )
        out = [results[i] for i in range(len(events))]
        for ev, r in zip(events, out, strict=True):
            if r.accepted and not r.duplicate:
                metrics.FEEDBACK_EVENTS.labels(ev.WhichOneof("kind")).inc()
            elif not r.accepted:
                metrics.FEEDBACK_REJECTED.labels(r.code or "UNKNOWN").inc()
        return out


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, ingest: FeedbackIngest) -> None:
        self.ingest = ingest

    async def Submit(self, request: pb.SubmitRequest, context: aio.ServicerContext) -> pb.SubmitResponse:
        if not request.events:
            raise _error("INVALID_ARGUMENT", "events is empty: send at least one feedback event")
        if len(request.events) > MAX_EVENTS_PER_SUBMIT:
            raise _error(
                "INVALID_ARGUMENT",
                f"{len(request.events)} events in one Submit; the limit is {MAX_EVENTS_PER_SUBMIT} "
                "(split the batch, or use SubmitStream)",
            )
        results = await self.ingest.commit(list(request.events))
        accepted = sum(r.accepted for r in results)
        if accepted == 0:
            first = results[0]
            raise _error(first.code or "INVALID_ARGUMENT", f"event 0 ({quote(first.idempotency_key)}): {first.reason}")
        return pb.SubmitResponse(
            results=[result_to_pb(r) for r in results], accepted=accepted, rejected=len(results) - accepted
        )

    async def SubmitStream(
        self, request_iterator: AsyncIterator[pb.FeedbackEvent], context: aio.ServicerContext
    ) -> pb.SubmitSummary:
        summary = pb.SubmitSummary()
        inflight: list[asyncio.Task[list[FeedbackResult]]] = []
        chunk: list[pb.FeedbackEvent] = []
        offset = 0

        def absorb(results: list[FeedbackResult]) -> None:
            for r in results:
                if r.accepted:
                    summary.accepted += 1
                    summary.duplicates += int(r.duplicate)
                else:
                    summary.rejected += 1
                    if len(summary.rejections) < MAX_REJECTIONS_REPORTED:
                        summary.rejections.append(result_to_pb(r))

        async def flush() -> None:
            nonlocal chunk, offset
            if chunk:
                inflight.append(asyncio.create_task(self.ingest.commit(chunk, offset)))
                offset += len(chunk)
                chunk = []
            while len(inflight) >= MAX_INFLIGHT:  # back-pressure: stop reading until a commit lands
                absorb(await inflight.pop(0))

        try:
            async for event in request_iterator:
                summary.received += 1
                chunk.append(event)
                if len(chunk) >= STREAM_CHUNK:
                    await flush()
            await flush()
            for task in inflight:
                absorb(await task)
        finally:
            for task in inflight:
                if not task.done():
                    task.cancel()
        return summary
