"""RewardFrontend: the async layer between the servicer and the runtime.

It owns what is neither protobuf nor torch: the dynamic batcher, the version each request is pinned
to, and the store watch. Score and Compare calls share one batcher (a Compare is two pairs), so a
trainer scoring rollouts and an app comparing answers fill the same batches. The gRPC servicer and
a Ray Serve deployment both call it.
"""

from __future__ import annotations

import asyncio
import logging

from loopserve.config import RewardConfig
from loopserve.device import dtype_name
from loopserve.models.slot import SlotWatches
from loopserve.serving.batcher import Batcher, DynamicBatcher
from reward_service.runtime import HasPairs, RewardRuntime
from reward_service.types import CompareCall, CompareResult, Limits, ModelInfo, ScoreCall, ScoreResult

logger = logging.getLogger(__name__)


def limits_of(cfg: RewardConfig) -> Limits:
    return Limits(max_pairs_per_request=cfg.max_pairs_per_request, max_text_chars=cfg.max_text_chars)


class RewardFrontend:
    """Both engines run this: the grpc.aio app with its DynamicBatcher (the default), a Ray Serve
    replica with a ServeBatcher over its `@serve.batch` method."""

    def __init__(
        self, cfg: RewardConfig, runtime: RewardRuntime, *, score_batcher: Batcher[HasPairs, list[float]] | None = None
    ) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.limits = limits_of(cfg)
        self.score_batcher: Batcher[HasPairs, list[float]] = score_batcher or DynamicBatcher(
            "score",
            runtime.score_batch,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            max_queue=max(cfg.max_queue, cfg.max_pairs_per_request),
            retry_alone=True,
        )
        self.watches = SlotWatches(runtime.slots())

    async def start(self, watch: bool = True) -> None:
        await asyncio.to_thread(self.runtime.load)
        self.score_batcher.start()
        if watch:
            self.watches.start(self.cfg.watch_interval_s, self.cfg.watch_events)

    async def stop(self) -> None:
        await self.watches.stop()
        await self.score_batcher.stop()
        self.watches.close()

    # ---- calls ---------------------------------------------------------------------------------

    async def score(self, call: ScoreCall) -> ScoreResult:
        handle = self.runtime.reward.current  # pinned for the whole request
        scores = await self.score_batcher.submit(handle, call, size=len(call.pairs))
        return ScoreResult.of(handle.version, scores, call, handle.model.stats)

    async def compare(self, call: CompareCall) -> CompareResult:
        handle = self.runtime.reward.current  # both responses are scored by the same version
        score_a, score_b = await self.score_batcher.submit(handle, call, size=2)
        return CompareResult.from_scores(handle.version, score_a, score_b)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_version=self.runtime.reward.current.version,
            limits=self.limits,
            max_input_tokens=self.runtime.opts.max_input_tokens,
            device=str(self.runtime.opts.device),
            dtype=dtype_name(self.runtime.opts.dtype),
        )
