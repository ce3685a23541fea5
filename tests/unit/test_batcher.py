"""DynamicBatcher mechanics: batching, per-caller results, back-pressure, cancellation, version keys."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from loopserve.errors import ResourceExhausted
from loopserve.serving.batcher import DynamicBatcher


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[object, list[int]]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key: object, requests: list[int]) -> list[int]:
        self.gate.wait()
        time.sleep(self.delay)
        self.batches.append((key, list(requests)))
        return [r * 10 for r in requests]


async def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    rec = Recorder(delay=0.02)
    b = DynamicBatcher("t", rec, max_batch_size=8, max_wait_ms=20, max_queue=100)
    b.start()
    results = await asyncio.gather(*(b.submit("k", i) for i in range(32)))
    await b.stop()
    assert results == [i * 10 for i in range(32)]
    assert max(len(reqs) for _, reqs in rec.batches) > 1  # batching happened
    assert all(len(reqs) <= 8 for _, reqs in rec.batches)


async def test_requests_on_different_keys_never_share_a_batch() -> None:
    rec = Recorder()
    b = DynamicBatcher("t", rec, max_batch_size=16, max_wait_ms=20, max_queue=100)
    b.start()
    await asyncio.gather(*(b.submit("v1" if i % 2 else "v2", i) for i in range(20)))
    await b.stop()
    for key, reqs in rec.batches:
        assert all((r % 2 == 1) == (key == "v1") for r in reqs)


async def test_full_queue_is_resource_exhausted_not_unbounded() -> None:
    rec = Recorder()
    rec.gate.clear()  # the model is stuck: nothing drains
    b = DynamicBatcher("t", rec, max_batch_size=2, max_wait_ms=1, max_queue=4)
    b.start()
    tasks = [asyncio.create_task(b.submit("k", i)) for i in range(6)]
    await asyncio.sleep(0.1)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await b.submit("k", 99, size=3)
    rec.gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    await b.stop()
    assert sum(isinstance(d, int) for d in done) >= 4


async def test_cancelled_request_leaves_the_batch() -> None:
    rec = Recorder()
    b = DynamicBatcher("t", rec, max_batch_size=64, max_wait_ms=300, max_queue=100)
    b.start()
    doomed = asyncio.create_task(b.submit("k", 1))
    kept = asyncio.create_task(b.submit("k", 2))
    await asyncio.sleep(0.05)
    doomed.cancel()
    assert await kept == 20
    await b.stop()
    ran = [r for _, reqs in rec.batches for r in reqs]
    assert ran == [2]
    assert b.queued_items == 0


async def test_a_failing_batch_fails_its_callers_and_the_worker_survives() -> None:
    calls = {"n": 0}

    def flaky(key: object, reqs: list[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return reqs

    b = DynamicBatcher("t", flaky, max_batch_size=4, max_wait_ms=1, max_queue=10)
    b.start()
    with pytest.raises(RuntimeError):
        await b.submit("k", 1)
    assert await b.submit("k", 5) == 5
    await b.stop()


async def test_one_request_fault_fails_that_request_alone() -> None:
    """A per-request error result fails its caller only; a batch that fails as a whole is re-run one
    request at a time (retry_alone), so the request at fault is found and the others are answered."""
    seen: list[list[int]] = []

    def run(key: object, requests: list[int]) -> list[int | Exception]:
        seen.append(list(requests))
        if 13 in requests:  # e.g. a text the tokenizer chokes on: the whole batch raises
            raise ValueError("unlucky")
        return [ValueError("odd one") if r == 7 else r * 10 for r in requests]

    b = DynamicBatcher("t", run, max_batch_size=16, max_wait_ms=50, max_queue=100, retry_alone=True)
    b.start()
    results = await asyncio.gather(*(b.submit("k", i) for i in (1, 7, 13, 2)), return_exceptions=True)
    await b.stop()
    assert results[0] == 10 and results[3] == 20
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd one"
    assert isinstance(results[2], ValueError) and str(results[2]) == "unlucky"
    assert seen[0] == [1, 7, 13, 2] and [13] in seen[1:]  # one batch, then each alone

    plain = DynamicBatcher("t", run, max_batch_size=16, max_wait_ms=50, max_queue=100)
    plain.start()  # without retry_alone (generation: tokens already streamed), everyone gets the error
    results = await asyncio.gather(*(plain.submit("k", i) for i in (1, 13)), return_exceptions=True)
    await plain.stop()
    assert all(isinstance(r, ValueError) for r in results)
