"""DynamicBatcher: gather concurrent requests into model batches, off the event loop.

Requests wait in a bounded queue (a full queue is RESOURCE_EXHAUSTED: back-pressure, never an unbounded
queue). A worker takes the oldest request, then keeps taking requests that run on the same model handle
until the batch holds `max_batch_size` items or `max_wait_ms` has passed, and runs the batch on one
executor thread. Each request carries the model handle it was admitted under, so a request in flight when
a new version is swapped in finishes on the version it started with, and one response never mixes
versions. A request whose caller went away (cancelled, deadline passed) is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from loopserve import metrics
from loopserve.errors import ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")
Req_contra = TypeVar("Req_contra", contravariant=True)
Res_co = TypeVar("Res_co", covariant=True)


class Batcher(Protocol[Req_contra, Res_co]):
    """What a Frontend submits requests to. The embedded server uses DynamicBatcher (below) and
    ContinuousBatcher; a Ray Serve replica uses ServeBatcher (loopserve/serving/ray.py) over its
    `@serve.batch` methods. `key` is the model version the request is pinned to: a batch never mixes
    two."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, key: Any, request: Req_contra, size: int = 1) -> Res_co: ...


@dataclass(eq=False)
class _Pending(Generic[Req, Res]):
    key: Any  # the model handle the request runs on
    request: Req
    size: int
    future: asyncio.Future[Res]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[Req, Res]):
    """`run_batch(key, requests) -> results` runs on the executor thread, one batch at a time. A result
    that is an exception fails that request alone."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Any, list[Req]], Sequence[Res | BaseException]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
        retry_alone: bool = False,
    ) -> None:
        self.name = name
        # A failed batch is re-run one request at a time, so one request's fault (say, a text the
        # tokenizer chokes on) fails that request alone. Only for side-effect-free batches: never
        # for streaming generation, whose tokens already went out.
        self.retry_alone = retry_alone
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: collections.deque[_Pending[Req, Res]] = collections.deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._closing = False
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._batch_size = metrics.BATCH_SIZE.labels(name)

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closing = True
        if self._task is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            await self._task
            self._task = None
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def submit(self, key: Any, request: Req, size: int = 1) -> Res:
        if self._closing:
            raise Unavailable("the server is draining; retry on another replica")
        if self._task is None:
            raise Unavailable(f"batcher {self.name} is not started")
        if self._queued_items + size > self.max_queue:
            raise ResourceExhausted(
                f"{self.name} queue is full ({self._queued_items} items waiting, limit {self.max_queue}); "
                "retry with back-off"
            )
        loop = asyncio.get_running_loop()
        pending: _Pending[Req, Res] = _Pending(key, request, size, loop.create_future())
        self._queue.append(pending)
        self._queued_items += size
        self._depth.set(self._queued_items)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away (deadline, cancel): its request leaves the queue if still there.
            pending.future.cancel()
            if pending in self._queue:  # not taken into a batch yet: give its room back now
                self._queue.remove(pending)
                self._queued_items -= pending.size
                self._depth.set(self._queued_items)
            raise

    def _take_batch(self) -> tuple[Any, list[_Pending[Req, Res]]]:
        """Pop the oldest live request and every following one on the same key, up to the batch limit."""
        batch: list[_Pending[Req, Res]] = []
        key: Any = None
        items = 0
        kept: collections.deque[_Pending[Req, Res]] = collections.deque()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():  # cancelled while waiting
                self._queued_items -= p.size
                continue
            if not batch:
                key = p.key
            elif p.key is not key or items + p.size > self.max_batch_size:
                kept.append(p)
                if items >= self.max_batch_size:
                    break
                continue
            batch.append(p)
            items += p.size
            self._queued_items -= p.size
            if items >= self.max_batch_size:
                break
        kept.extend(self._queue)
        self._queue = kept
        self._depth.set(self._queued_items)
        return key, batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let a batch fill: wait until it is full or the oldest request has waited max_wait.
            deadline = self._queue[0].enqueued + self.max_wait
            while self._queued_items < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            # In its own frame, so that no local keeps the last batch's model handle (and requests)
            # alive while the worker idles: ModelSlot frees a retired version when its last user ends.
            await self._run_one(loop, *self._take_batch())

    async def _run_one(self, loop: asyncio.AbstractEventLoop, key: Any, batch: list[_Pending[Req, Res]]) -> None:
        if not batch:
            return
        self._batch_size.observe(sum(p.size for p in batch))
        requests = [p.request for p in batch]
        try:
            results: Sequence[Res | BaseException] = await loop.run_in_executor(
                self._executor, self.run_batch, key, requests
            )
        except Exception as exc:
            if not self.retry_alone or len(batch) == 1:  # every caller gets the error
                results = [exc] * len(batch)
            else:  # find the request at fault: each runs alone, so the others still get answers
                logger.warning(
                    "batcher %s: a batch of %d failed (%s); running each alone",
                    self.name,
                    len(batch),
                    type(exc).__name__,
                )
                results = [await self._run_alone(loop, key, r) for r in requests]
        for p, r in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(r, BaseException):  # this request's own error (run_batch isolates rows)
                p.future.set_exception(r)
            else:
                p.future.set_result(r)

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, key: Any, request: Req) -> Res | BaseException:
        try:
            return (await loop.run_in_executor(self._executor, self.run_batch, key, [request]))[0]
        except Exception as exc:
            return exc
