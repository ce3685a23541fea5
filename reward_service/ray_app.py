"""The reward service as a Ray Serve application behind Ray's gRPC proxy (`reward_service.ray_app:app`).

The deployment runs the same RewardFrontend and servicer as the grpc.aio app (reward_service/app.py):
Score and Compare share one `@serve.batch` behind the Batcher protocol (a Compare is two pairs), each
request is pinned to the version it was admitted under, and every replica follows the store's LATEST.
Auth, status codes and metrics per method come from loopserve/serving/ray.py. Same protos and service
names (`loopserve.reward.v1.RewardService`, `loopserve.admin.v1.ModelAdmin`, `grpc.health.v1.Health`);
admin calls that change what is served are taken only while the deployment has one replica.

    serve run reward_service.ray_app:app store_dir=/srv/store num_cpus=0.5     # or a Serve config

`app` is an application builder: Serve calls it with the application's `args` (RewardConfig and
RayDeploymentConfig field names), then `LOOPSERVE_*` variables, then the defaults. With several
applications on the proxy, clients send metadata `application: reward`.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from loopserve import heap
from loopserve.config import REWARD_SERVICE, RewardConfig
from loopserve.device import configure_threads
from loopserve.models.slot import Loaded
from loopserve.models.store import ModelStore
from loopserve.reward.v1 import reward_pb2 as pb
from loopserve.serving.ray import (
    RayDeploymentConfig,
    ReplicaAdmin,
    ReplicaHealth,
    ReplicaMetrics,
    ServeBatcher,
    configure_replica_logging,
    deployment_options,
    model_executor,
    prepare_server_config,
    read_configs,
    refuse_http,
    rpc,
    run_pinned,
    serve_batching,
    single_replica,
)
from loopserve.serving.ray_admin import AdminAndHealthMethods
from loopserve.serving.server import token_table
from reward_service.frontend import RewardFrontend
from reward_service.runtime import HasPairs, RewardRuntime, RuntimeOptions
from reward_service.servicer import RewardServicer

logger = logging.getLogger(__name__)


@serve.deployment(name="reward")
class RewardDeployment(AdminAndHealthMethods):
    """One replica: a RewardRuntime behind the RewardFrontend, its store watch and its metrics endpoint.
    Methods are named after the RPCs: Ray's proxy calls the one the client called, and each hands the
    request to the servicer the grpc.aio app runs."""

    async def __init__(self, cfg: RewardConfig, ray_cfg: RayDeploymentConfig) -> None:  # type: ignore[misc]
        configure_replica_logging(cfg.log_level)
        configure_threads(cfg.threads)
        self.cfg = cfg
        self.tokens = token_table(cfg)
        runtime = RewardRuntime(ModelStore(cfg.store_path), RuntimeOptions.of(cfg))
        self._model = model_executor("reward")
        self.score_batch.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
        self.score_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)  # type: ignore[attr-defined]
        self.frontend = RewardFrontend(
            cfg, runtime, score_batcher=ServeBatcher(self.score_batch) if serve_batching(ray_cfg) else None
        )
        await self.frontend.start()  # loads the model, watches the store's LATEST
        self.servicer = RewardServicer(self.frontend)
        self.admin = ReplicaAdmin(runtime.slots(), single_replica(ray_cfg))
        self.health = ReplicaHealth(runtime.healthy)
        self.metrics = ReplicaMetrics.start(cfg.metrics_port, cfg.metrics_address)
        self._closed = False
        heap.freeze_startup_objects()  # as the grpc.aio services do (loopserve.heap)
        logger.info("reward replica ready (reward %s)", runtime.reward.current.version)

    async def __call__(self, request: Any) -> Any:  # Ray's HTTP proxy: no HTTP API here, say so
        return await refuse_http(request)

    def check_health(self) -> None:
        if not self.frontend.runtime.healthy():
            raise RuntimeError("the reward model is not loaded")

    async def __del__(self) -> None:
        """Ray awaits this on a graceful shutdown (after in-flight requests); only the first call acts."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        await self.frontend.stop()
        if self.metrics is not None:
            self.metrics.close()
        self._model.shutdown(wait=False)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score_batch(self, jobs: list[tuple[Loaded[Any], HasPairs]]) -> list[list[float] | BaseException]:
        runtime = self.frontend.runtime
        return await run_pinned(self._model, runtime.score_batch, jobs, "score", lambda c: len(c.pairs))

    # ---- RewardService: the servicer the grpc.aio app runs ------------------------------------------

    @rpc(REWARD_SERVICE, pb.ScoreResponse)
    async def Score(self, request: pb.ScoreRequest, grpc_context: Any) -> pb.ScoreResponse:
        return await self.servicer.Score(request, grpc_context)

    @rpc(REWARD_SERVICE, pb.CompareResponse)
    async def Compare(self, request: pb.CompareRequest, grpc_context: Any) -> pb.CompareResponse:
        return await self.servicer.Compare(request, grpc_context)

    @rpc(REWARD_SERVICE, pb.ModelInfo)
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context: Any) -> pb.ModelInfo:
        return await self.servicer.GetModelInfo(request, grpc_context)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The reward application from its `args` (see the module docstring)."""
    cfg, ray_cfg = read_configs(RewardConfig, args)
    prepare_server_config(cfg, ray_cfg)
    options = deployment_options(ray_cfg, cfg, cfg.max_batch_size)
    return RewardDeployment.options(**options).bind(cfg, ray_cfg)  # type: ignore[attr-defined]


app = build_app
