"""ContinuousBatcher: requests join and leave a running decode batch at token boundaries.

The DynamicBatcher (batcher.py) forms a batch, runs it to the end, then forms the next: right for an
encoder forward, wrong for generation, where a 4-token request would wait behind 128-token ones. Here
one decode thread owns a running batch per model version (a `DecodeGroup`) and loops: admit waiting
jobs while there is room (`max_rows`), decode one token for every live row, hand back the jobs that
ended. A job is one request's rows (n completions), admitted whole and answered whole.

What it keeps from the DynamicBatcher: a bounded queue (RESOURCE_EXHAUSTED when full), the version a
request was admitted under (its key: rows of a retired version finish on it while new requests start
on the new one, each version its own group), a caller that went away leaving the queue at once, and a
drain on stop. A group whose forward raises fails its own rows only; a job whose admission (prefill)
raises fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from loopserve import metrics
from loopserve.errors import ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

Job = TypeVar("Job")
Res = TypeVar("Res")


class DecodeGroup(Protocol):
    """One model version's running batch (policy_service/continuous.py holds the torch one)."""

    @property
    def rows(self) -> int: ...

    def admit(self, jobs: list[tuple[Hashable, Any]]) -> None: ...

    def step(self) -> None: ...

    def fail_all(self, error: Exception) -> None: ...

    def pop_finished(self) -> list[tuple[Hashable, Any]]: ...


@dataclass(eq=False)
class _Pending(Generic[Job, Res]):
    key: Any  # the model handle the job runs on
    job: Job
    size: int  # rows
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Res] = field(init=False)
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    def resolve(self, result: Res | BaseException) -> None:
        """From the decode thread: settle the caller's future on its event loop."""
        self.loop.call_soon_threadsafe(self._settle, result)

    def _settle(self, result: Res | BaseException) -> None:
        if self.future.done():  # the caller went away meanwhile
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


class ContinuousBatcher(Generic[Job, Res]):
    """`open_group(key)` makes a key's decode group; `finish(key, job, group_result)` turns a finished
    job's group output into the caller's result (or the exception that job alone fails with). Both run
    on the decode thread."""

    def __init__(
        self,
        name: str,
        open_group: Callable[[Any], DecodeGroup],
        prepare: Callable[[Job], Any],
        finish: Callable[[Any, Job, Any], Res | BaseException],
        *,
        max_rows: int,
        max_queue: int,
        max_wait_ms: float = 0.0,
    ) -> None:
        self.name = name
        self.open_group = open_group
        self.prepare = prepare  # job -> what the group admits (its rows)
        self.finish = finish
        self.max_rows = max_rows
        self.max_queue = max_queue
        # An idle batch waits this long for company before its first prefill, so requests sent together
        # are prefilled together (one forward) rather than one after another; a running batch needs no
        # wait: the next token boundary is the window.
        self.max_wait = max_wait_ms / 1000.0
        self._lock = threading.Condition()
        self._waiting: list[_Pending[Job, Res]] = []  # guarded by _lock
        self._queued_rows = 0  # guarded by _lock
        self._groups: dict[int, tuple[Any, DecodeGroup]] = {}  # decode thread only; id(key) -> (key, group)
        self._running: dict[int, _Pending[Job, Res]] = {}  # decode thread only; id(pending) -> pending
        self._thread: threading.Thread | None = None
        self._closing = False
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._batch_size = metrics.BATCH_SIZE.labels(name)

    @property
    def queued_items(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"decode-{self.name}", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Finish what is queued and running, then stop the decode thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def submit(self, key: Any, job: Job, size: int = 1) -> Res:
        if self._closing:
            raise Unavailable("the server is draining; retry on another replica")
        if self._thread is None:
            raise Unavailable(f"batcher {self.name} is not started")
        pending: _Pending[Job, Res] = _Pending(key, job, size, asyncio.get_running_loop())
        with self._lock:
            if self._queued_rows + size > self.max_queue:
                raise ResourceExhausted(
                    f"{self.name} queue is full ({self._queued_rows} sequences waiting, limit {self.max_queue}); "
                    "retry with back-off"
                )
            self._waiting.append(pending)
            self._queued_rows += size
            self._depth.set(self._queued_rows)
            self._lock.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away: out of the queue if still waiting (a running job's rows see their
            # own cancellation flag at the next token and stop there).
            pending.future.cancel()
            with self._lock:
                if pending in self._waiting:
                    self._waiting.remove(pending)
                    self._queued_rows -= pending.size
                    self._depth.set(self._queued_rows)
            raise

    # ---- the decode thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._running and not self._closing:
                    self._lock.wait()
                if self._closing and not self._waiting and not self._running:
                    return
                if not self._running:
                    deadline = self._waiting[0].enqueued + self.max_wait
                    while self._queued_rows < self.max_rows and not self._closing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._lock.wait(remaining)
                admitted = self._take()
            self._admit(admitted)
            self._step()

    def _take(self) -> list[_Pending[Job, Res]]:
        """Waiting jobs, oldest first, while their rows fit beside the running ones (a job larger than
        the whole batch runs when the batch is empty, alone). Called under the lock."""
        room = self.max_rows - sum(p.size for p in self._running.values())
        taken: list[_Pending[Job, Res]] = []
        while self._waiting:
            p = self._waiting[0]
            if p.future.done():  # cancelled while waiting
                self._waiting.pop(0)
                self._queued_rows -= p.size
                continue
            if p.size > room and (self._running or taken):
                break  # first come, first served: no overtaking by smaller jobs
            self._waiting.pop(0)
            self._queued_rows -= p.size
            room -= p.size
            taken.append(p)
        self._depth.set(self._queued_rows)
        return taken

    def _admit(self, admitted: list[_Pending[Job, Res]]) -> None:
        by_key: dict[int, list[_Pending[Job, Res]]] = {}
        for p in admitted:
            by_key.setdefault(id(p.key), []).append(p)
        for pendings in by_key.values():
            key = pendings[0].key
            try:
                if id(key) not in self._groups:
                    self._groups[id(key)] = (key, self.open_group(key))
                group = self._groups[id(key)][1]
                group.admit([(id(p), self.prepare(p.job)) for p in pendings])
            except Exception as exc:  # the prefill failed: these jobs fail, the running rows decode on
                logger.warning(
                    "batcher %s: admitting %d jobs failed (%s)", self.name, len(pendings), type(exc).__name__
                )
                for p in pendings:
                    p.resolve(exc)
                continue
            for p in pendings:
                self._running[id(p)] = p
            self._collect(key, group)

    def _step(self) -> None:
        for gid, (key, group) in list(self._groups.items()):
            if group.rows:
                self._batch_size.observe(group.rows)
                try:
                    group.step()
                except Exception as exc:  # the forward itself broke: this group's rows end with it
                    logger.error("batcher %s: a decode step failed (%s)", self.name, type(exc).__name__)
                    group.fail_all(exc)
                self._collect(key, group)
            if not group.rows:
                # Drop the group (and with it the model handle) so a retired version can be freed.
                del self._groups[gid]

    def _collect(self, key: Any, group: DecodeGroup) -> None:
        for token, out in group.pop_finished():
            p = self._running.pop(token)  # type: ignore[call-overload]
            try:
                result = self.finish(key, p.job, out)
            except Exception as exc:
                result = exc
            p.resolve(result)


__all__ = ["ContinuousBatcher", "DecodeGroup"]
