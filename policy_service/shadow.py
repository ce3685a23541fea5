"""Shadow mode: a candidate annotator version beside the serving one, answering copies of live traffic.

A served Annotate call is offered to the shadow *after* its answer is ready; the copy waits in a
bounded queue (dropped and counted when the shadow falls behind: serving never waits for it) and a
worker runs the candidate on it in its own low-priority thread. The candidate's answers go nowhere but
into the evidence: agreement of its top label with serving's, its mean top probability beside
serving's (metrics `loopserve_shadow_*` and a periodic log line, ids and counts only). Promotion is an
admin call (`PromoteShadow`), or automatic once `min_items` items agree at `promote_agreement` or more;
it pins the candidate in the serving slot, as Rollback pins, so the store watch keeps it, and Rollback
undoes it in one call.

The candidate is loaded with the serving slot's own loader and checks (checksums, label set, a smoke
batch), not in a second `ModelSlot`: a slot writes the process's hold on versions of its model in the
store, and a second slot for the same model would overwrite the serving slot's hold.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import threading
import time
from dataclasses import dataclass

from loopserve import metrics
from loopserve.config import PolicyConfig
from loopserve.errors import FailedPrecondition
from loopserve.models.slot import Loaded, ModelSlot
from loopserve.serving.shadow_control import ShadowEvidence
from policy_service.runtime import AnnotatorBundle, PolicyRuntime
from policy_service.types import AnnotateCall, AnnotateResult

logger = logging.getLogger(__name__)

SHADOW_BATCH = 64  # items per candidate forward
LOG_EVERY_S = 10.0
SHADOW_NICE = 10  # the worker thread's niceness (Linux): serving threads come first


@dataclass(frozen=True)
class ShadowPolicy:
    fraction: float = 1.0
    """Share of Annotate calls copied to the shadow."""
    max_queue: int = 2048
    """Items waiting for the shadow before further copies are dropped."""
    promote_agreement: float = 0.0
    """Promote automatically once agreement reaches this (0: only by the admin call)."""
    min_items: int = 500
    """Items the shadow must have answered before automatic promotion."""


def shadow_policy_of(cfg: PolicyConfig) -> ShadowPolicy:
    """The shadow's settings from the policy service's config (--shadow-*)."""
    if not 0.0 <= cfg.shadow_fraction <= 1.0:
        raise ValueError(f"shadow_fraction must lie in [0, 1], got {cfg.shadow_fraction}")
    if not 0.0 <= cfg.shadow_promote_agreement <= 1.0:
        raise ValueError(f"shadow_promote_agreement must lie in [0, 1], got {cfg.shadow_promote_agreement}")
    return ShadowPolicy(cfg.shadow_fraction, cfg.max_queue, cfg.shadow_promote_agreement, cfg.shadow_min_items)


@dataclass(frozen=True)
class _Copy:
    texts: tuple[str, ...]
    serving_top: tuple[str, ...]
    """Serving's argmax label per item (with exploration on, the served label may differ)."""
    serving_conf: tuple[float, ...]


def _init_worker_thread() -> None:
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):  # per-thread on Linux
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)


class ShadowAnnotator:
    model_name = "annotator"

    def __init__(self, runtime: PolicyRuntime, policy: ShadowPolicy, rng: random.Random | None = None) -> None:
        self.runtime = runtime
        self.slot: ModelSlot[AnnotatorBundle] = runtime.annotator
        self.policy = policy
        self.rng = rng or random.Random()
        self.evidence = ShadowEvidence()
        self._candidate: Loaded[AnnotatorBundle] | None = None
        self._queue: asyncio.Queue[_Copy] | None = None
        self._queued_items = 0
        self._worker: asyncio.Task[None] | None = None
        self._promoting = False
        self._promoting_to = ""
        """The version a promotion is switching to, until it returns: the slot serves it before the
        promotion's own await resumes, and status() must not show it serving yet unpromoted."""
        self._last_log = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="shadow", initializer=_init_worker_thread
        )

    # ---- admin verbs ---------------------------------------------------------------------------

    async def start(self, version: str) -> ShadowEvidence:
        """Load and check `version` beside the serving one, then copy live traffic to it."""
        loaded = await self.slot.call(self._load, version)  # the slot's loader thread, in order with swaps
        await self._end()
        self._candidate = loaded
        self.evidence = ShadowEvidence(candidate=version, serving=self.slot.current.version)
        self._queue = asyncio.Queue()
        self._queued_items = 0
        self._worker = asyncio.create_task(self._run())
        metrics.SHADOW_AGREEMENT.set(0.0)
        logger.info("shadow annotator %s started beside %s", version, self.evidence.serving)
        return self.evidence

    def _load(self, version: str) -> Loaded[AnnotatorBundle]:
        # Read and checked the way a swap reads a version: each file hashed in the pass that loads it
        # (NOT_FOUND for an unknown version), an encoder shared with the serving version reused.
        reader = self.slot.store.reader(self.slot.name, version)
        bundle = self.slot.loader(reader, self.slot.current)
        reader.check_rest()
        loaded = Loaded(self.slot.name, version, reader.manifest, bundle)
        if self.slot.check is not None:
            self.slot.check(loaded, self.slot.current)  # label set, smoke batch
        return loaded

    def status(self) -> ShadowEvidence:
        if self._promoting_to and self.slot.current.version == self._promoting_to:
            self.evidence.promoted = self._promoting_to
        self.evidence.pending = self._queued_items if self._queue is not None else 0
        return self.evidence

    async def stop(self) -> ShadowEvidence:
        """End the shadow (copies still waiting are dropped); returns its last evidence (GetShadow then
        shows none)."""
        evidence = self.status()
        await self._end()
        self.evidence = ShadowEvidence()
        return evidence

    async def promote(self) -> tuple[str, str]:
        """Serve the candidate (pinned) and end the shadow: (previous serving version, promoted)."""
        if self._candidate is None:
            raise FailedPrecondition("no shadow is running; StartShadow first")
        version = self._candidate.version
        previous = self.slot.current.version
        self._promoting_to = version
        try:
            await self.slot.call(self.slot.pin, version)  # load + verify + switch between batches, then pin
        finally:
            self._promoting_to = ""
        evidence = self.evidence
        await self._end()
        evidence.promoted = version
        self.evidence = evidence
        logger.info(
            "promoted shadow annotator %s over %s after %d items (agreement %.3f)",
            version, previous, evidence.items, evidence.agreement,
        )  # fmt: skip
        return previous, version

    async def close(self) -> None:
        await self._end()
        self._executor.shutdown(wait=True)

    async def _end(self) -> None:
        worker, self._worker = self._worker, None
        self._candidate = None
        self._queue = None
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    # ---- traffic -------------------------------------------------------------------------------

    def offer(self, call: AnnotateCall, result: AnnotateResult) -> None:
        """A copy of a served call for the candidate. Never blocks and never raises: the client's answer
        is already made, and nothing the shadow does may touch it."""
        queue = self._queue
        if queue is None or self._candidate is None or self.rng.random() >= self.policy.fraction:
            return
        n = len(call.texts)
        if self._queued_items + n > self.policy.max_queue:
            self.evidence.dropped += n
            metrics.SHADOW_ITEMS.labels("dropped").inc(n)
            return
        tops, confs = [], []
        for a in result.annotations:
            best = max(a.labels, key=lambda lb: lb.score)  # serving's argmax, whatever was served
            tops.append(best.label)
            confs.append(best.score)
        self._queued_items += n
        queue.put_nowait(_Copy(call.texts, tuple(tops), tuple(confs)))

    async def _run(self) -> None:
        queue, candidate = self._queue, self._candidate
        assert queue is not None and candidate is not None
        loop = asyncio.get_running_loop()
        while True:
            copies = [await queue.get()]
            while not queue.empty() and sum(len(c.texts) for c in copies) < SHADOW_BATCH:
                copies.append(queue.get_nowait())
            n = sum(len(c.texts) for c in copies)
            self._queued_items -= n
            texts = [t for c in copies for t in c.texts]
            try:
                probs = await loop.run_in_executor(
                    self._executor, self.runtime.label_probs, candidate.model, texts
                )  # (n, L)
            except Exception as exc:  # the candidate's fault: counted, logged by type, never raised
                metrics.SHADOW_ITEMS.labels("failed").inc(n)
                logger.error("shadow annotator %s failed on %d items: %s", candidate.version, n, type(exc).__name__)
                continue
            self._record(candidate, copies, probs)
            if self._should_promote():
                self._promoting = True
                try:
                    await self.promote()
                except Exception as exc:  # a refused load keeps serving as it was
                    logger.error("automatic promotion of %s failed: %s", candidate.version, exc)
                finally:
                    self._promoting = False
                return

    def _record(self, candidate: Loaded[AnnotatorBundle], copies: list[_Copy], probs: list[list[float]]) -> None:
        labels = candidate.model.labels
        ev = self.evidence
        k = 0
        for c in copies:
            for top, conf in zip(c.serving_top, c.serving_conf, strict=True):
                p = probs[k]
                j = max(range(len(p)), key=lambda i: p[i])
                agree = labels[j] == top
                ev.items += 1
                ev.agreements += agree
                ev.confidence_sum += p[j]
                ev.serving_confidence_sum += conf
                metrics.SHADOW_ITEMS.labels("agree" if agree else "disagree").inc()
                metrics.SHADOW_CONFIDENCE.observe(p[j])
                k += 1
        metrics.SHADOW_AGREEMENT.set(ev.agreement)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            logger.info(
                "shadow annotator %s beside %s: %d items, agreement %.3f, confidence %.3f (serving %.3f), "
                "dropped %d",
                ev.candidate, self.slot.current.version, ev.items, ev.agreement, ev.mean_confidence,
                ev.serving_mean_confidence, ev.dropped,
            )  # fmt: skip

    def _should_promote(self) -> bool:
        p, ev = self.policy, self.evidence
        return (
            p.promote_agreement > 0
            and not self._promoting
            and ev.items >= p.min_items
            and ev.agreement >= p.promote_agreement
        )
