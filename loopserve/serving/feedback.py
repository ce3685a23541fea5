"""FeedbackService (hosted by the policy service process): acknowledge feedback once it is durable.

`Submit` answers per event; when no event of the batch is accepted, the call fails with the first
rejection's status, so a single-event caller gets plain gRPC semantics (NOT_FOUND for an unknown
event_id, ...) and a batch caller still sees every reason. `SubmitStream` commits while it reads (up
to `MAX_INFLIGHT` chunks in flight, the back-pressure) and answers with a summary at the end: what the
summary counts as accepted is durable. `SubmitChunks` is the bulk fast path: the client sends chunks of
events and gets one ack per chunk, in order, as each commits. A streamed message costs grpc-python
~80 us whatever it holds (a server that only counts SubmitStream messages takes ~12k/s on 2 cores), so
one message per event caps SubmitStream far below the log's own append rate; a chunk pays that once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

from grpc import aio

from loopserve import metrics
from loopserve.errors import InvalidArgument, LoopserveError, quote
from loopserve.feedback.v1 import feedback_pb2 as pb
from loopserve.feedback.v1 import feedback_pb2_grpc
from loopserve.feedback_log import GroupCommitter, LabelSets
from loopserve.feedback_log.records import CONFLICT_CODE, FeedbackResult
from loopserve.serving.feedback_wire import NO_KIND, feedback_from_pb, rejected, result_to_pb

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

    def __init__(self, committer: GroupCommitter, label_sets: Callable[[], LabelSets]) -> None:
        self.committer = committer
        self.label_sets = label_sets

    async def commit(self, events: Sequence[pb.FeedbackEvent]) -> list[FeedbackResult]:
        """One result per event, `index` its position in `events`; accepted ones are durable.

        Only the event kinds are read here; the conversion to records runs on the committer's thread
        (`submit_deferred`), where it does not fight the commit for the GIL."""
        kinds: list[str | None] = [ev.WhichOneof("kind") for ev in events]
        if None in kinds:  # rare: reject the events without a kind here, convert the rest
            where = [i for i, k in enumerate(kinds) if k is not None]
            sendable: Sequence[pb.FeedbackEvent] = [events[i] for i in where]
        else:
            where, sendable = list(range(len(events))), events
        committed: list[FeedbackResult] = []
        if sendable:
            future = self.committer.submit_deferred(
                len(sendable), lambda: [feedback_from_pb(ev) for ev in sendable], self.label_sets()
            )
            committed = await asyncio.wrap_future(future)
        if len(where) == len(events):
            out = committed  # already indexed by position: the committer answers each caller in its own indices
        else:
            # The events without a kind are rejected; the results of those sent are put in their places.
            out = [rejected(i, ev, "INVALID_ARGUMENT", NO_KIND) for i, ev in enumerate(events)]
            for i, r in zip(where, committed, strict=True):
                out[i] = dataclasses.replace(r, index=i)
        # One metric update per kind and code, not per event: labels() costs as much as converting an event.
        stored: collections.Counter[str] = collections.Counter()
        refused: collections.Counter[str] = collections.Counter()
        kind: str | None
        for kind, r in zip(kinds, out, strict=True):
            if r.accepted:
                if not r.duplicate:
                    stored[kind or ""] += 1
            else:
                refused[r.code or "UNKNOWN"] += 1
        for stored_kind, n in stored.items():
            metrics.FEEDBACK_EVENTS.labels(stored_kind).inc(n)
        for code, n in refused.items():
            metrics.FEEDBACK_REJECTED.labels(code).inc(n)
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
        inflight: collections.deque[tuple[int, asyncio.Task[list[FeedbackResult]]]] = collections.deque()
        chunk: list[pb.FeedbackEvent] = []
        received = accepted = duplicates = 0
        offset = 0

        def absorb(start: int, results: list[FeedbackResult]) -> None:
            nonlocal accepted, duplicates
            for r in results:
                if r.accepted:
                    accepted += 1
                    duplicates += r.duplicate
                else:
                    summary.rejected += 1
                    if len(summary.rejections) < MAX_REJECTIONS_REPORTED:
                        summary.rejections.append(result_to_pb(dataclasses.replace(r, index=start + r.index)))

        async def flush() -> None:
            nonlocal chunk, offset
            if chunk:
                inflight.append((offset, asyncio.create_task(self.ingest.commit(chunk))))
                offset += len(chunk)
                chunk = []
            while len(inflight) >= MAX_INFLIGHT:  # back-pressure: stop reading until a commit lands
                start, task = inflight.popleft()
                absorb(start, await task)

        try:
            async for event in request_iterator:
                received += 1
                chunk.append(event)
                if len(chunk) >= STREAM_CHUNK:
                    await flush()
            await flush()
            while inflight:
                start, task = inflight.popleft()
                absorb(start, await task)
        finally:
            for _, task in inflight:
                task.cancel()
        summary.received, summary.accepted, summary.duplicates = received, accepted, duplicates
        return summary

    async def SubmitChunks(
        self, request_iterator: AsyncIterator[pb.SubmitRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ChunkAck]:
        """Read chunks and start their commits while earlier ones are still being written (up to
        `MAX_INFLIGHT`, the back-pressure); answer each, in order, once it is durable. A bad chunk (empty,
        oversize, not a message) ends the stream with INVALID_ARGUMENT after the chunks before it are
        answered; a client re-sends from the first chunk it has no ack for."""
        room = asyncio.Semaphore(MAX_INFLIGHT)
        commits: asyncio.Queue[asyncio.Task[list[FeedbackResult]] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                n = 0
                async for request in request_iterator:
                    events = request.events
                    if not events:
                        raise InvalidArgument(f"chunk {n} is empty: send at least one feedback event a chunk")
                    if len(events) > MAX_EVENTS_PER_SUBMIT:
                        raise InvalidArgument(
                            f"chunk {n} holds {len(events)} events; the limit is {MAX_EVENTS_PER_SUBMIT} a chunk"
                        )
                    await room.acquire()
                    commits.put_nowait(asyncio.create_task(self.ingest.commit(events)))
                    n += 1
            finally:
                commits.put_nowait(None)  # never blocks: the queue is unbounded, `room` bounds it

        reader = asyncio.create_task(read())
        try:
            n = 0
            while (task := await commits.get()) is not None:
                results = await task
                room.release()
                yield chunk_ack(n, results)
                n += 1
            await reader  # the reader's error (a bad chunk), once every chunk before it is answered
        finally:
            reader.cancel()
            while not commits.empty():
                if (left := commits.get_nowait()) is not None:
                    left.cancel()


def chunk_ack(chunk: int, results: Sequence[FeedbackResult]) -> pb.ChunkAck:
    accepted = duplicates = 0
    problems = []
    for r in results:
        if r.accepted:
            accepted += 1
            if r.duplicate:
                duplicates += 1
                if r.code == CONFLICT_CODE:
                    problems.append(result_to_pb(r))
        else:
            problems.append(result_to_pb(r))
    return pb.ChunkAck(
        chunk=chunk,
        accepted=accepted,
        rejected=len(results) - accepted,
        duplicates=duplicates,
        problems=problems,
    )
