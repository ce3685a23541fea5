"""PolicyFrontend: the async layer between the servicer and the runtime.

It owns what is neither protobuf nor torch: the dynamic batchers, the version each request is pinned
to, the store watch, and the seam where served answers become decision records in the feedback log
(`DecisionSink`). The gRPC servicer and the Ray Serve deployment both call it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Protocol

from loopserve.config import PolicyConfig
from loopserve.device import dtype_name
from loopserve.errors import FailedPrecondition
from loopserve.models.slot import SlotWatches
from loopserve.serving.batcher import Batcher, DynamicBatcher
from loopserve.serving.continuous_batcher import ContinuousBatcher
from policy_service.runtime import PolicyRuntime
from policy_service.sampling import SequenceRequest
from policy_service.shadow import ShadowAnnotator
from policy_service.types import (
    AnnotateCall,
    AnnotateResult,
    Annotation,
    Completion,
    GenerateCall,
    GenerateResult,
    Limits,
    ModelInfo,
    TokenDelta,
)

logger = logging.getLogger(__name__)

GenerateJob = tuple[GenerateCall, list[int], list[SequenceRequest]]  # the call, its prompt ids, its rows


class DecisionSink(Protocol):
    """Where served answers go to be logged. `record_*` must not block; raise ResourceExhausted when
    the log cannot take them, so an answer that could never be joined is not served."""

    def reserve(self, count: int) -> None: ...

    def record_annotations(self, call: AnnotateCall, result: AnnotateResult, client_id: str) -> None: ...

    def record_completions(self, call: GenerateCall, result: GenerateResult, client_id: str) -> None: ...


def limits_of(cfg: PolicyConfig) -> Limits:
    return Limits(
        max_items_per_request=cfg.max_items_per_request,
        max_text_chars=cfg.max_text_chars,
        max_new_tokens_default=cfg.max_new_tokens_default,
        max_new_tokens_cap=cfg.max_new_tokens_cap,
        max_completions=cfg.max_completions,
    )


class PolicyFrontend:
    """Both engines run this: the grpc.aio app with its own batchers (the defaults), a Ray Serve replica
    with ServeBatchers over its `@serve.batch` methods."""

    def __init__(
        self,
        cfg: PolicyConfig,
        runtime: PolicyRuntime,
        decisions: DecisionSink | None = None,
        *,
        annotate_batcher: Batcher[AnnotateCall, list[Annotation]] | None = None,
        generate_batcher: Batcher[GenerateJob, list[Completion]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.decisions = decisions
        self.limits = limits_of(cfg)
        self.annotate_batcher: Batcher[AnnotateCall, list[Annotation]] = annotate_batcher or DynamicBatcher(
            "annotate",
            runtime.annotate_batch,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            max_queue=cfg.max_queue,
            retry_alone=True,
        )
        gen_queue = max(cfg.gen_max_batch_size * 8, cfg.max_completions)
        self.generate_batcher: Batcher[GenerateJob, list[Completion]]
        if generate_batcher is not None:
            self.generate_batcher = generate_batcher
        elif cfg.gen_batching == "continuous":
            # Requests join and leave the running decode batch at token boundaries.
            self.generate_batcher = ContinuousBatcher(
                "generate",
                runtime.decode_batch,
                prepare=lambda job: job[2],  # the job's rows
                finish=runtime.completions,
                max_rows=cfg.gen_max_batch_size,
                max_queue=gen_queue,
                max_wait_ms=cfg.max_wait_ms,
            )
        else:  # static: a batch runs from its first token to its last row's end
            self.generate_batcher = DynamicBatcher(
                "generate",
                runtime.generate_batch,
                max_batch_size=cfg.gen_max_batch_size,
                max_wait_ms=cfg.max_wait_ms,
                max_queue=gen_queue,
            )
        self.watches = SlotWatches(runtime.slots())
        self.shadow: ShadowAnnotator | None = None
        """Set by the app when shadow mode is available: gets a copy of each served Annotate call."""

    async def start(self, watch: bool = True) -> None:
        await asyncio.to_thread(self.runtime.load)
        self.annotate_batcher.start()
        self.generate_batcher.start()
        if watch:
            self.watches.start(self.cfg.watch_interval_s, self.cfg.watch_events)

    async def stop(self) -> None:
        await self.watches.stop()
        if self.shadow is not None:
            await self.shadow.close()
        await self.annotate_batcher.stop()
        await self.generate_batcher.stop()
        self.watches.close()

    # ---- calls ---------------------------------------------------------------------------------

    async def annotate(self, call: AnnotateCall, client_id: str = "") -> AnnotateResult:
        if self.decisions is not None:
            self.decisions.reserve(len(call.texts))
        handle = self.runtime.annotator.current  # pinned for the whole request
        anns = await self.annotate_batcher.submit(handle, call, size=len(call.texts))
        result = AnnotateResult(handle.version, tuple(anns))
        if self.decisions is not None:
            self.decisions.record_annotations(call, result, client_id)
        if self.shadow is not None:
            self.shadow.offer(call, result)  # after the answer is made; never blocks, never raises
        return result

    def _generator(self):  # type: ignore[no-untyped-def]
        if self.runtime.generator is None:
            raise FailedPrecondition("this service runs without a generator (--generator off)")
        return self.runtime.generator.current

    async def generate(self, call: GenerateCall, client_id: str = "") -> GenerateResult:
        if self.decisions is not None:
            self.decisions.reserve(call.n)
        handle = self._generator()
        ids = self.runtime.prompt_ids(handle, call)
        cancelled = threading.Event()
        seqs = self.runtime.sequence_requests(call, ids, cancelled=cancelled.is_set)
        try:
            comps = await self.generate_batcher.submit(handle, (call, ids, seqs), size=call.n)
        except asyncio.CancelledError:
            cancelled.set()  # a running batch drops the rows of a caller that went away
            raise
        result = GenerateResult(handle.version, tuple(comps))
        if self.decisions is not None:
            self.decisions.record_completions(call, result, client_id)
        return result

    async def generate_stream(
        self, call: GenerateCall, client_id: str = ""
    ) -> AsyncIterator[tuple[str, str, TokenDelta]]:
        """Yields (model_version, event_id, delta); the last delta has done=True."""
        if self.decisions is not None:
            self.decisions.reserve(1)
        handle = self._generator()
        ids = self.runtime.prompt_ids(handle, call)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        cancelled = threading.Event()

        def on_token(delta: TokenDelta) -> None:  # decode thread -> event loop
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        seqs = self.runtime.sequence_requests(call, ids, on_token=on_token, cancelled=cancelled.is_set)
        job = asyncio.ensure_future(self.generate_batcher.submit(handle, (call, ids, seqs), size=1))
        try:
            # The event_id exists once the batch finishes; stream deltas now, name the event last.
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    delta = getter.result()
                    if delta.done:
                        comps = await job
                        result = GenerateResult(handle.version, tuple(comps))
                        if self.decisions is not None:
                            self.decisions.record_completions(call, result, client_id)
                        yield handle.version, comps[0].event_id, delta
                        return
                    yield handle.version, "", delta
                else:
                    getter.cancel()
                    comps = job.result()  # raises the batch's error, if any
                    # Finished without a final delta (cancelled row): flush what is queued.
                    while not queue.empty():
                        yield handle.version, "", queue.get_nowait()
                    result = GenerateResult(handle.version, tuple(comps))
                    if self.decisions is not None:
                        self.decisions.record_completions(call, result, client_id)
                    yield (
                        handle.version,
                        comps[0].event_id,
                        TokenDelta("", 0.0, True, comps[0].finish_reason, comps[0].num_tokens),
                    )
                    return
        finally:
            cancelled.set()
            if not job.done():
                job.cancel()

    def model_info(self) -> ModelInfo:
        ann = self.runtime.annotator.current
        gen = self.runtime.generator.current.version if self.runtime.generator is not None else ""
        spec = ann.model.model.spec
        return ModelInfo(
            task=self.cfg.task,
            labels=[(lb.name, lb.description) for lb in spec.labels],
            annotator_version=ann.version,
            generator_version=gen,
            limits=self.limits,
            max_input_tokens=self.cfg.max_input_tokens,
            review_threshold=self.cfg.review_threshold,
            device=str(self.runtime.opts.device),
            dtype=dtype_name(self.runtime.opts.dtype),
        )

    def label_set(self) -> list[str]:
        return self.runtime.annotator.current.model.labels
