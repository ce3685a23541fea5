"""The reward service as a Ray Serve application behind Ray's gRPC proxy (`reward_service.ray_app:app`).

The deployment wraps `RewardRuntime` as the grpc.aio servicer wraps it through `RewardFrontend`:
Score and Compare share one `@serve.batch` (a Compare is two pairs), each request is pinned to the
version it was admitted under, and every replica follows the store's LATEST. Auth, status codes,
metrics and the watch come from loopserve/ray_serve.py. Same protos and service name
(`loopserve.reward.v1.RewardService`); ModelAdmin is not exposed on the shared proxy.

    serve run reward_service.ray_app:app store_dir=/srv/store num_cpus=0.5     # or a Serve config

`app` is an application builder: Serve calls it with the application's `args` (RewardConfig and
RayDeploymentConfig field names), then `LOOPSERVE_*` variables, then the defaults. With several
applications on the proxy, clients send metadata `application: reward`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from loopserve.config import REWARD_SERVICE, RewardConfig
from loopserve.device import configure_threads, pick_device, pick_dtype
from loopserve.model_slot import Loaded
from loopserve.model_store import ModelStore
from loopserve.ray_serve import (
    ReplicaMetrics,
    SlotWatch,
    configure_replica_logging,
    deployment_options,
    model_executor,
    prepare_server_config,
    read_configs,
    refuse_http,
    rpc,
    run_pinned,
    unwrap,
)
from loopserve.reward.v1 import reward_pb2 as pb
from loopserve.server import token_table
from reward_service.runtime import HasPairs, RewardRuntime, RuntimeOptions
from reward_service.service import limits_of
from reward_service.types import CompareCall, CompareResult, ModelInfo, ScoreCall, ScoreResult

logger = logging.getLogger(__name__)


@serve.deployment(name="reward")
class RewardDeployment:
    """One replica: a RewardRuntime, its store watch and its metrics endpoint. Methods are named after
    the RPCs: Ray's proxy calls the one the client called."""

    async def __init__(self, cfg: RewardConfig) -> None:  # type: ignore[misc]  # Ray awaits an async __init__
        configure_replica_logging(cfg.log_level)
        configure_threads(cfg.threads)
        self.cfg = cfg
        self.limits = limits_of(cfg)
        self.tokens = token_table(cfg)
        device = pick_device(cfg.device)
        self.runtime = RewardRuntime(
            ModelStore(cfg.store_path),
            RuntimeOptions(device=device, dtype=pick_dtype(cfg.dtype, device), max_input_tokens=cfg.max_input_tokens),
        )
        await asyncio.to_thread(self.runtime.load)
        self._model = model_executor("reward")
        self.score_batch.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
        self.score_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)  # type: ignore[attr-defined]
        self.watch = SlotWatch(self.runtime.slots().values(), cfg.watch_interval_s, cfg.watch_events)
        self.metrics = ReplicaMetrics.start(cfg.metrics_port, cfg.metrics_address)
        self._closed = False
        logger.info("reward replica ready (reward %s)", self.runtime.reward.current.version)

    async def __call__(self, request: Any) -> Any:  # Ray's HTTP proxy: no HTTP API here, say so
        return await refuse_http(request)

    def check_health(self) -> None:
        if not self.runtime.healthy():
            raise RuntimeError("the reward model is not loaded")

    def __del__(self) -> None:
        """Ray calls this on a graceful shutdown (after in-flight requests); Python may call it again."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.watch.stop()
        if self.metrics is not None:
            self.metrics.close()
        self._model.shutdown(wait=False)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score_batch(self, jobs: list[tuple[Loaded[Any], HasPairs]]) -> list[list[float] | Exception]:
        return await run_pinned(self._model, self.runtime.score_batch, jobs, "score", lambda c: len(c.pairs))

    @rpc(REWARD_SERVICE, pb.ScoreResponse)
    async def Score(self, request: pb.ScoreRequest, grpc_context: Any) -> pb.ScoreResponse:
        call = ScoreCall.from_pb(request, self.limits)
        handle = self.runtime.reward.current  # pinned for the whole request
        scores = unwrap(await self.score_batch((handle, call)))
        return ScoreResult.of(handle.version, scores, call, handle.model.stats).to_pb()

    @rpc(REWARD_SERVICE, pb.CompareResponse)
    async def Compare(self, request: pb.CompareRequest, grpc_context: Any) -> pb.CompareResponse:
        call = CompareCall.from_pb(request, self.limits)
        handle = self.runtime.reward.current  # both responses are scored by the same version
        score_a, score_b = unwrap(await self.score_batch((handle, call)))
        return CompareResult.from_scores(handle.version, score_a, score_b).to_pb()

    @rpc(REWARD_SERVICE, pb.ModelInfo)
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context: Any) -> pb.ModelInfo:
        return ModelInfo(
            model_version=self.runtime.reward.current.version,
            limits=self.limits,
            max_input_tokens=self.runtime.opts.max_input_tokens,
            device=str(self.runtime.opts.device),
        ).to_pb()


def build_app(args: dict[str, Any]) -> serve.Application:
    """The reward application from its `args` (see the module docstring)."""
    cfg, ray_cfg = read_configs(RewardConfig, args)
    prepare_server_config(cfg, ray_cfg)
    options = deployment_options(ray_cfg, cfg, cfg.max_batch_size)
    return RewardDeployment.options(**options).bind(cfg)  # type: ignore[attr-defined]


app = build_app
