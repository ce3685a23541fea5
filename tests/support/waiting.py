"""Waiting on a condition with a deadline, instead of sleeping a fixed time and hoping; and on a killed
service's processes to be gone."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable

import psutil


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Return as soon as `condition()` is true; fail the test with `what` once `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


async def wait_until_async(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.02
) -> None:
    """`wait_until` for a coroutine: sleeps without blocking its event loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


def kill9_and_reap(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGKILL `proc` and wait until it and every process it had started are gone. The policy service's
    feedback writer (loopserve.feedback_log.commit_process) commits the batches it had already read before
    it sees its socket close, so the feedback log holds still only once the writer has exited too (counted
    before that, one run on a busy core saw 2,000 stored events where the restarted service found 4,000)."""
    started = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(started, timeout=timeout_s)
    assert not alive, f"processes outlived their SIGKILLed service: {[p.pid for p in alive]}"
