"""RewardFrontend: the async layer between the servicer and the runtime.

It owns what is neither protobuf nor torch: the dynamic batcher, the version each request is pinned
to, and the store watch. Score and Compare calls share one batcher (a Compare is two pairs), so a
trainer scoring rollouts and an app comparing answers fill the same batches. The gRPC servicer and
a Ray Serve deployment both call it.
"""

from __future__ import annotations

import asyncio
import logging

from loopserve.batcher import DynamicBatcher
from loopserve.config import RewardConfig
from reward_service.runtime import HasPairs, RewardRuntime
from reward_service.types import CompareCall, CompareResult, Limits, ModelInfo, ScoreCall, ScoreResult

logger = logging.getLogger(__name__)


def limits_of(cfg: RewardConfig) -> Limits:
    return Limits(max_pairs_per_request=cfg.max_pairs_per_request, max_text_chars=cfg.max_text_chars)


class RewardFrontend:
    def __init__(self, cfg: RewardConfig, runtime: RewardRuntime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.limits = limits_of(cfg)
        self.score_batcher: DynamicBatcher[HasPairs, list[float]] = DynamicBatcher(
            "score",
            runtime.score_batch,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            max_queue=max(cfg.max_queue, cfg.max_pairs_per_request),
            retry_alone=True,
        )
        self._stop_watch = asyncio.Event()
        self._watches: list[asyncio.Task[None]] = []

    async def start(self, watch: bool = True) -> None:
        await asyncio.to_thread(self.runtime.load)
        self.score_batcher.start()
        if watch:
            for slot in self.runtime.slots().values():
                watching = slot.watch(self.cfg.watch_interval_s, self._stop_watch, events=self.cfg.watch_events)
                self._watches.append(asyncio.create_task(watching))

    async def stop(self) -> None:
        self._stop_watch.set()
        for t in self._watches:
            await t
        self._watches.clear()
        await self.score_batcher.stop()
        for slot in self.runtime.slots().values():
            slot.close()  # stop its loader thread and release its hold on store versions

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
        )
