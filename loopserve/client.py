"""A small Python client for loopserve, sync and async, over the generated stubs.

    from loopserve.client import Client
    with Client("127.0.0.1:50051", token=...) as c:
        r = c.annotate(["Great coffee, will buy again"])
        print(r.model_version, r.annotations[0].labels[0].label)

Tokens go in `authorization: Bearer` metadata; TLS by `root_certificates` (and a client key/cert for
mTLS); every call has a deadline; calls are retried with exponential back-off only on UNAVAILABLE and
RESOURCE_EXHAUSTED (back-pressure), never on errors a retry cannot fix.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio

from loopserve.admin.v1 import admin_pb2, admin_pb2_grpc
from loopserve.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from loopserve.policy.v1 import policy_pb2, policy_pb2_grpc
from loopserve.reward.v1 import reward_pb2, reward_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def retryable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE, or RESOURCE_EXHAUSTED as back-pressure; not grpc's own RESOURCE_EXHAUSTED for a
    message over the size limit, which the same request will hit again."""
    code = error.code()
    if code not in RETRYABLE:
        return False
    return not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (error.details() or ""))


def _lost_status(error: aio.AioRpcError) -> bool:
    """grpc.aio's client reports INTERNAL "Internal error from Core" in place of the server's status when
    the server ends a stream while the client is still sending (grpc/grpc#36066), e.g. UNAVAILABLE in the
    middle of a SubmitChunks stream. Only well-formed, acknowledged-or-not chunks were sent, so re-sending
    the unacknowledged ones is safe."""
    return error.code() == grpc.StatusCode.INTERNAL and error.details() == "Internal error from Core"


T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def backoff(self, attempt: int) -> float:
        cap = min(self.max_backoff_s, self.initial_backoff_s * (2**attempt))
        return random.uniform(cap / 2, cap)  # jitter: retries from many clients do not align


def _credentials(
    root_certificates: bytes | Path | None, private_key: bytes | Path | None, certificate_chain: bytes | Path | None
) -> grpc.ChannelCredentials | None:
    def read(x: bytes | Path | None) -> bytes | None:
        return x.read_bytes() if isinstance(x, Path) else x

    if root_certificates is None and private_key is None:
        return None
    return grpc.ssl_channel_credentials(read(root_certificates), read(private_key), read(certificate_chain))


def _items(texts: Sequence[str] | Sequence[tuple[str, str]]) -> list[policy_pb2.Item]:
    """Plain texts get ids "0", "1", ...; (id, text) pairs keep theirs."""
    out = []
    for i, t in enumerate(texts):
        item_id, text = (t[0], t[1]) if isinstance(t, tuple) else (str(i), t)
        out.append(policy_pb2.Item(id=item_id, text=str(text)))
    return out


def generate_request(prompt: str, **kw: Any) -> policy_pb2.GenerateRequest:
    stop = kw.pop("stop", ())
    return policy_pb2.GenerateRequest(prompt=prompt, stop=list(stop), **{k: v for k, v in kw.items() if v is not None})


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
]


def _score_request(pairs: Sequence[tuple[str, str]], normalised: bool, clip: float) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        pairs=[reward_pb2.Pair(prompt=p, response=r) for p, r in pairs],
        scale=reward_pb2.REWARD_SCALE_NORMALISED if normalised else reward_pb2.REWARD_SCALE_RAW,
        clip=clip,
    )


def wait_until_serving(
    target: str,
    timeout_s: float = 120.0,
    service: str = "",
    *,
    root_certificates: bytes | Path | None = None,
    private_key: bytes | Path | None = None,
    certificate_chain: bytes | Path | None = None,
) -> None:
    """Block until `target` reports SERVING on grpc.health.v1 (a Watch stream, no polling), or raise
    TimeoutError. A process that is still starting (port not open yet) is waited for too. The TLS
    arguments are the clients' (a CA to trust; a key and chain for mTLS)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    creds = _credentials(root_certificates, private_key, certificate_chain)
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=service), timeout=max(0.001, deadline - time.monotonic())
            )
            for update in stream:
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    stream.cancel()
                    return
        except (grpc.FutureTimeoutError, grpc.RpcError):
            pass
    raise TimeoutError(f"{target} did not report SERVING within {timeout_s:.0f}s")


DEFAULT_CHUNK_EVENTS = 1000
"""Events per SubmitChunks message: large enough that grpc's per-message cost vanishes, small enough that
a lost stream re-sends little."""
MAX_CHUNK_EVENTS = 10_000  # the service's limit per chunk (and per Submit)
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # well below the server's 32 MiB message limit
_MAX_REJECTIONS = 100


class ChunkedSubmission:
    """Events cut into SubmitChunks chunks, and what the acks said so far.

    A chunk closes at `chunk_events` events or `MAX_CHUNK_BYTES`, whichever comes first, so that long
    texts never make a message the server refuses for its size. `acked` counts the leading chunks the
    service has acknowledged (durable); after a lost stream, `unacked()` is what to send again.
    `summary` folds the acks like SubmitStream's summary, with each rejection's `index` the event's
    position in the whole submission.
    """

    def __init__(self, events: Iterable[feedback_pb2.FeedbackEvent], chunk_events: int) -> None:
        if not 1 <= chunk_events <= MAX_CHUNK_EVENTS:
            raise ValueError(f"chunk_events must lie in [1, {MAX_CHUNK_EVENTS}], got {chunk_events}")
        self.chunks: list[feedback_pb2.SubmitRequest] = []
        self.starts: list[int] = []  # position of each chunk's first event in the submission
        current: list[feedback_pb2.FeedbackEvent] = []
        size = total = 0
        for event in events:
            n = event.ByteSize() + 8  # + the repeated field's tag and length
            if current and (len(current) >= chunk_events or size + n > MAX_CHUNK_BYTES):
                self._close(current, total)
                total += len(current)
                current, size = [], 0
            current.append(event)
            size += n
        if current:
            self._close(current, total)
            total += len(current)
        self.acked = 0
        self.summary = feedback_pb2.SubmitSummary(received=total)

    def _close(self, events: list[feedback_pb2.FeedbackEvent], start: int) -> None:
        self.chunks.append(feedback_pb2.SubmitRequest(events=events))
        self.starts.append(start)

    @property
    def done(self) -> bool:
        return self.acked == len(self.chunks)

    def unacked(self) -> Iterator[feedback_pb2.SubmitRequest]:
        return iter(self.chunks[self.acked :])

    def absorb(self, ack: feedback_pb2.ChunkAck, first_chunk: int) -> None:
        """Count `ack`, which answers chunk `ack.chunk` of a stream that began at chunk `first_chunk`."""
        position = first_chunk + ack.chunk
        if position != self.acked:
            raise RuntimeError(f"ack for chunk {position} arrived while {self.acked} was expected")
        s = self.summary
        s.accepted += ack.accepted
        s.rejected += ack.rejected
        s.duplicates += ack.duplicates
        for problem in ack.problems:
            if not problem.accepted and len(s.rejections) < _MAX_REJECTIONS:
                r = s.rejections.add()
                r.CopyFrom(problem)
                r.index = self.starts[position] + problem.index
        self.acked += 1


class _Stubs:
    """What both clients share: the channel, the stubs, the call metadata, the retry policy."""

    _secure: Any = staticmethod(grpc.secure_channel)
    _insecure: Any = staticmethod(grpc.insecure_channel)

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        root_certificates: bytes | Path | None = None,
        private_key: bytes | Path | None = None,
        certificate_chain: bytes | Path | None = None,
        client_id: str = "",
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        creds = _credentials(root_certificates, private_key, certificate_chain)
        self.channel = (
            self._secure(target, creds, _CHANNEL_OPTIONS) if creds else self._insecure(target, _CHANNEL_OPTIONS)
        )
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        md = list(metadata)
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if client_id:
            md.append(("x-client-id", client_id))
        self.metadata = tuple(md)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.admin = admin_pb2_grpc.ModelAdminStub(self.channel)


class Client(_Stubs):
    """Blocking client for the policy, feedback, reward and admin services on one target."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn: Callable[..., T], request: Any, timeout_s: float | None) -> T:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        for attempt in range(self.retry.attempts):
            remaining = deadline - time.monotonic()
            try:
                return fn(request, timeout=max(remaining, 0.001), metadata=self.metadata)
            except grpc.RpcError as e:
                last = attempt == self.retry.attempts - 1
                if not retryable(e) or last:
                    raise
                pause = self.retry.backoff(attempt)
                if time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    # ---- policy --------------------------------------------------------------------------------

    def annotate(
        self,
        texts: Sequence[str] | Sequence[tuple[str, str]],
        *,
        task: str = "",
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> policy_pb2.AnnotateResponse:
        req = policy_pb2.AnnotateRequest(task=task, items=_items(texts), top_k=top_k)
        return self._call(self.policy.Annotate, req, timeout_s)

    def generate(self, prompt: str, *, timeout_s: float | None = None, **kw: Any) -> policy_pb2.GenerateResponse:
        return self._call(self.policy.Generate, generate_request(prompt, **kw), timeout_s)

    def generate_stream(
        self, prompt: str, *, timeout_s: float | None = None, **kw: Any
    ) -> Iterator[policy_pb2.GenerateStreamResponse]:
        return self.policy.GenerateStream(
            generate_request(prompt, **kw), timeout=timeout_s or self.timeout_s, metadata=self.metadata
        )

    def model_info(self) -> policy_pb2.ModelInfo:
        return self._call(self.policy.GetModelInfo, policy_pb2.GetModelInfoRequest(), None)

    # ---- feedback ------------------------------------------------------------------------------

    def submit(
        self, events: Sequence[feedback_pb2.FeedbackEvent], *, timeout_s: float | None = None
    ) -> feedback_pb2.SubmitResponse:
        return self._call(self.feedback.Submit, feedback_pb2.SubmitRequest(events=list(events)), timeout_s)

    def submit_stream(
        self, events: Iterable[feedback_pb2.FeedbackEvent], *, timeout_s: float | None = None
    ) -> feedback_pb2.SubmitSummary:
        # Not retried: a client stream cannot be replayed from an iterator (idempotency keys make a
        # caller's own retry safe).
        return self.feedback.SubmitStream(iter(events), timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def submit_chunks(
        self,
        events: Iterable[feedback_pb2.FeedbackEvent],
        *,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
        timeout_s: float | None = None,
    ) -> feedback_pb2.SubmitSummary:
        """Bulk feedback over SubmitChunks, the fast path: what the summary counts as accepted is durable.
        A stream lost with UNAVAILABLE / RESOURCE_EXHAUSTED is reopened (retry policy) and only the
        chunks without an ack are sent again."""
        sub = ChunkedSubmission(events, chunk_events)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while not sub.done:
            first = sub.acked
            try:
                acks = self.feedback.SubmitChunks(
                    sub.unacked(), timeout=max(deadline - time.monotonic(), 0.001), metadata=self.metadata
                )
                for ack in acks:
                    sub.absorb(ack, first)
            except grpc.RpcError as e:
                attempt = 0 if sub.acked > first else attempt + 1  # progress resets the count
                pause = self.retry.backoff(attempt)
                if not retryable(e) or attempt >= self.retry.attempts or time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
        return sub.summary

    # ---- reward --------------------------------------------------------------------------------

    def score(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        timeout_s: float | None = None,
        normalised: bool = False,
        clip: float = 0.0,
    ) -> reward_pb2.ScoreResponse:
        """Rewards, raw or normalised ((r - mean) / std of the version's reference set, clipped to
        [-clip, clip]; clip 0 means the service's default)."""
        req = _score_request(pairs, normalised, clip)
        return self._call(self.reward.Score, req, timeout_s)

    def compare(self, prompt: str, a: str, b: str, *, timeout_s: float | None = None) -> reward_pb2.CompareResponse:
        return self._call(self.reward.Compare, reward_pb2.CompareRequest(prompt=prompt, a=a, b=b), timeout_s)

    # ---- admin ---------------------------------------------------------------------------------

    def list_versions(self, model: str) -> admin_pb2.ListVersionsResponse:
        return self._call(self.admin.ListVersions, admin_pb2.ListVersionsRequest(model=model), None)

    def load_version(self, model: str, version: str, *, timeout_s: float = 120.0) -> admin_pb2.ModelStatus:
        return self._call(self.admin.LoadVersion, admin_pb2.LoadVersionRequest(model=model, version=version), timeout_s)

    def rollback(self, model: str, *, timeout_s: float = 120.0) -> admin_pb2.ModelStatus:
        return self._call(self.admin.Rollback, admin_pb2.RollbackRequest(model=model), timeout_s)

    def pin(self, model: str, version: str = "") -> admin_pb2.ModelStatus:
        return self._call(self.admin.Pin, admin_pb2.PinRequest(model=model, version=version), 120.0)

    def unpin(self, model: str) -> admin_pb2.ModelStatus:
        return self._call(self.admin.Unpin, admin_pb2.UnpinRequest(model=model), None)


class AsyncClient(_Stubs):
    """The same calls on grpc.aio, for asyncio apps and load generators."""

    _secure = staticmethod(aio.secure_channel)
    _insecure = staticmethod(aio.insecure_channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, fn: Callable[..., Any], request: Any, timeout_s: float | None) -> Any:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        for attempt in range(self.retry.attempts):
            remaining = deadline - time.monotonic()
            try:
                return await fn(request, timeout=max(remaining, 0.001), metadata=self.metadata)
            except aio.AioRpcError as e:
                if not retryable(e) or attempt == self.retry.attempts - 1:
                    raise
                pause = self.retry.backoff(attempt)
                if time.monotonic() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def annotate(
        self,
        texts: Sequence[str] | Sequence[tuple[str, str]],
        *,
        task: str = "",
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> policy_pb2.AnnotateResponse:
        req = policy_pb2.AnnotateRequest(task=task, items=_items(texts), top_k=top_k)
        return await self._call(self.policy.Annotate, req, timeout_s)

    async def generate(self, prompt: str, *, timeout_s: float | None = None, **kw: Any) -> policy_pb2.GenerateResponse:
        return await self._call(self.policy.Generate, generate_request(prompt, **kw), timeout_s)

    async def generate_stream(
        self, prompt: str, *, timeout_s: float | None = None, **kw: Any
    ) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        call = self.policy.GenerateStream(
            generate_request(prompt, **kw), timeout=timeout_s or self.timeout_s, metadata=self.metadata
        )
        async for msg in call:
            yield msg

    async def model_info(self) -> policy_pb2.ModelInfo:
        return await self._call(self.policy.GetModelInfo, policy_pb2.GetModelInfoRequest(), None)

    async def submit(
        self, events: Sequence[feedback_pb2.FeedbackEvent], *, timeout_s: float | None = None
    ) -> feedback_pb2.SubmitResponse:
        return await self._call(self.feedback.Submit, feedback_pb2.SubmitRequest(events=list(events)), timeout_s)

    async def submit_stream(
        self, events: Iterable[feedback_pb2.FeedbackEvent], *, timeout_s: float | None = None
    ) -> feedback_pb2.SubmitSummary:
        return await self.feedback.SubmitStream(
            iter(events), timeout=timeout_s or self.timeout_s, metadata=self.metadata
        )

    async def submit_chunks(
        self,
        events: Iterable[feedback_pb2.FeedbackEvent],
        *,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
        timeout_s: float | None = None,
    ) -> feedback_pb2.SubmitSummary:
        """As `Client.submit_chunks`: durable when counted; a lost stream re-sends only unacked chunks."""
        sub = ChunkedSubmission(events, chunk_events)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while not sub.done:
            first = sub.acked
            try:
                acks = self.feedback.SubmitChunks(
                    sub.unacked(), timeout=max(deadline - time.monotonic(), 0.001), metadata=self.metadata
                )
                async for ack in acks:
                    sub.absorb(ack, first)
            except aio.AioRpcError as e:
                attempt = 0 if sub.acked > first else attempt + 1
                pause = self.retry.backoff(attempt)
                if (
                    not (retryable(e) or _lost_status(e))
                    or attempt >= self.retry.attempts
                    or time.monotonic() + pause >= deadline
                ):
                    raise
                await asyncio.sleep(pause)
        return sub.summary

    async def score(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        timeout_s: float | None = None,
        normalised: bool = False,
        clip: float = 0.0,
    ) -> reward_pb2.ScoreResponse:
        req = _score_request(pairs, normalised, clip)
        return await self._call(self.reward.Score, req, timeout_s)

    async def compare(
        self, prompt: str, a: str, b: str, *, timeout_s: float | None = None
    ) -> reward_pb2.CompareResponse:
        return await self._call(self.reward.Compare, reward_pb2.CompareRequest(prompt=prompt, a=a, b=b), timeout_s)

    # ---- admin ---------------------------------------------------------------------------------

    async def list_versions(self, model: str) -> admin_pb2.ListVersionsResponse:
        return await self._call(self.admin.ListVersions, admin_pb2.ListVersionsRequest(model=model), None)

    async def load_version(self, model: str, version: str, *, timeout_s: float = 120.0) -> admin_pb2.ModelStatus:
        req = admin_pb2.LoadVersionRequest(model=model, version=version)
        return await self._call(self.admin.LoadVersion, req, timeout_s)

    async def rollback(self, model: str, *, timeout_s: float = 120.0) -> admin_pb2.ModelStatus:
        return await self._call(self.admin.Rollback, admin_pb2.RollbackRequest(model=model), timeout_s)

    async def pin(self, model: str, version: str = "") -> admin_pb2.ModelStatus:
        return await self._call(self.admin.Pin, admin_pb2.PinRequest(model=model, version=version), 120.0)

    async def unpin(self, model: str) -> admin_pb2.ModelStatus:
        return await self._call(self.admin.Unpin, admin_pb2.UnpinRequest(model=model), None)

    # ---- shadow mode (admin) ------------------------------------------------------------------------

    async def start_shadow(self, model: str, version: str, *, timeout_s: float = 120.0) -> admin_pb2.ShadowStatus:
        req = admin_pb2.StartShadowRequest(model=model, version=version)
        return await self._call(self.admin.StartShadow, req, timeout_s)

    async def get_shadow(self, model: str) -> admin_pb2.ShadowStatus:
        return await self._call(self.admin.GetShadow, admin_pb2.GetShadowRequest(model=model), None)

    async def promote_shadow(self, model: str, *, timeout_s: float = 120.0) -> admin_pb2.ModelStatus:
        return await self._call(self.admin.PromoteShadow, admin_pb2.PromoteShadowRequest(model=model), timeout_s)

    async def stop_shadow(self, model: str) -> admin_pb2.ShadowStatus:
        return await self._call(self.admin.StopShadow, admin_pb2.StopShadowRequest(model=model), None)
