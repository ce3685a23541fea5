"""The policy service as a Ray Serve application behind Ray's gRPC proxy (`policy_service.ray_app:app`).

The deployment runs the same PolicyFrontend and servicers as the grpc.aio app (policy_service/app.py);
what it adds is Ray's: `@serve.batch` behind the Batcher protocol (ServeBatcher) instead of the
embedded batchers, Ray's replicas, autoscaling and bounded queues, and per-method auth, status codes
and metrics from loopserve/serving/ray.py (Ray has no server interceptors). Same protos and service
names: `loopserve.policy.v1.PolicyService`, `loopserve.admin.v1.ModelAdmin`, `grpc.health.v1.Health`,
and `loopserve.feedback.v1.FeedbackService` when a feedback log is configured. Every replica follows
the store's LATEST; admin calls that change what is served are taken only while the deployment has
exactly one replica (with more, a call would reach one of them: move LATEST instead).

    serve run policy_service.ray_app:app store_dir=/srv/store num_replicas=2   # or a Serve config
    loopserve serve --engine ray                                               # policy + reward

`app` is an application builder: Serve calls it with the application's `args` (PolicyConfig and
RayDeploymentConfig field names); what `args` leaves out comes from `LOOPSERVE_*` variables, then the
defaults. When several applications share the proxy, clients send metadata `application: policy`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from loopserve import heap
from loopserve.config import FEEDBACK_SERVICE, POLICY_SERVICE, PolicyConfig
from loopserve.device import configure_threads
from loopserve.errors import FailedPrecondition
from loopserve.feedback.v1 import feedback_pb2 as fpb
from loopserve.models.slot import Loaded
from loopserve.models.store import ModelStore
from loopserve.policy.v1 import policy_pb2 as pb
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
from policy_service.decisions import PolicyLog
from policy_service.frontend import GenerateJob, PolicyFrontend
from policy_service.runtime import PolicyRuntime, RuntimeOptions
from policy_service.servicer import PolicyServicer
from policy_service.types import AnnotateCall, Annotation, Completion

logger = logging.getLogger(__name__)


@serve.deployment(name="policy")
class PolicyDeployment(AdminAndHealthMethods):
    """One replica: a PolicyRuntime behind the PolicyFrontend, its store watch, its metrics endpoint,
    and (with `log_url`) the feedback log. Methods are named after the RPCs: Ray's proxy calls the one
    the client called, and each hands the request to the servicer the grpc.aio app runs."""

    frontend: PolicyFrontend

    async def __init__(self, cfg: PolicyConfig, ray_cfg: RayDeploymentConfig) -> None:  # type: ignore[misc]
        configure_replica_logging(cfg.log_level)
        configure_threads(cfg.threads)
        self.cfg = cfg
        self.tokens = token_table(cfg)
        runtime = PolicyRuntime(ModelStore(cfg.store_path), RuntimeOptions.of(cfg))
        self._model = model_executor("policy")
        self.annotate_batch.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
        self.annotate_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)  # type: ignore[attr-defined]
        self.generate_batch.set_max_batch_size(cfg.gen_max_batch_size)  # type: ignore[attr-defined]
        self.generate_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)  # type: ignore[attr-defined]
        # Only with log_url: replicas share one log (PostgreSQL across nodes), never a per-replica default.
        self.feedback = PolicyLog(cfg, lambda: self.frontend.label_set()) if cfg.log_url else None
        self.frontend = PolicyFrontend(
            cfg,
            runtime,
            self.feedback.decisions if self.feedback is not None else None,
            annotate_batcher=ServeBatcher(self.annotate_batch) if serve_batching(ray_cfg) else None,
            generate_batcher=ServeBatcher(self.generate_batch) if serve_batching(ray_cfg) else None,
        )
        await self.frontend.start()  # loads the models, watches the store's LATEST
        self.servicer = PolicyServicer(self.frontend)
        self.admin = ReplicaAdmin(runtime.slots(), single_replica(ray_cfg))
        self.health = ReplicaHealth(runtime.healthy)
        self.metrics = ReplicaMetrics.start(cfg.metrics_port, cfg.metrics_address)
        self._closed = False
        heap.freeze_startup_objects()  # as the grpc.aio services do (loopserve.heap)
        logger.info("policy replica ready (annotator %s)", runtime.annotator.current.version)

    async def __call__(self, request: Any) -> Any:  # Ray's HTTP proxy: no HTTP API here, say so
        return await refuse_http(request)

    def check_health(self) -> None:
        if not self.frontend.runtime.healthy():
            raise RuntimeError("the policy models are not loaded")

    async def __del__(self) -> None:
        """Ray awaits this on a graceful shutdown (after in-flight requests); only the first call acts."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        await self.frontend.stop()
        if self.feedback is not None:
            self.feedback.close()  # writes the decisions still buffered
        if self.metrics is not None:
            self.metrics.close()
        self._model.shutdown(wait=False)

    # ---- batches (Ray's @serve.batch; sizes and waits come from the config in __init__) -----------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def annotate_batch(
        self, jobs: list[tuple[Loaded[Any], AnnotateCall]]
    ) -> list[list[Annotation] | BaseException]:
        runtime = self.frontend.runtime
        return await run_pinned(self._model, runtime.annotate_batch, jobs, "annotate", lambda c: len(c.texts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate_batch(
        self, jobs: list[tuple[Loaded[Any], GenerateJob]]
    ) -> list[list[Completion] | BaseException]:
        runtime = self.frontend.runtime
        return await run_pinned(self._model, runtime.generate_batch, jobs, "generate", lambda j: len(j[2]))

    # ---- PolicyService: the servicer the grpc.aio app runs ------------------------------------------

    @rpc(POLICY_SERVICE, pb.AnnotateResponse)
    async def Annotate(self, request: pb.AnnotateRequest, grpc_context: Any) -> pb.AnnotateResponse:
        return await self.servicer.Annotate(request, grpc_context)

    @rpc(POLICY_SERVICE, pb.GenerateResponse)
    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:
        return await self.servicer.Generate(request, grpc_context)

    @rpc(POLICY_SERVICE, pb.GenerateStreamResponse)
    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for response in self.servicer.GenerateStream(request, grpc_context):
            yield response

    @rpc(POLICY_SERVICE, pb.ModelInfo)
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context: Any) -> pb.ModelInfo:
        return await self.servicer.GetModelInfo(request, grpc_context)

    # ---- FeedbackService (with log_url) -----------------------------------------------------------

    def _feedback(self) -> PolicyLog:
        if self.feedback is None:
            raise FailedPrecondition(
                "this policy application has no feedback log: set log_url (LOOPSERVE_LOG_URL) to a "
                "postgresql:// URL shared by every replica"
            )
        return self.feedback

    @rpc(FEEDBACK_SERVICE, fpb.SubmitResponse)
    async def Submit(self, request: fpb.SubmitRequest, grpc_context: Any) -> fpb.SubmitResponse:
        return await self._feedback().servicer.Submit(request, grpc_context)

    @rpc(FEEDBACK_SERVICE, fpb.SubmitSummary)
    async def SubmitStream(
        self, request_stream: AsyncIterator[fpb.FeedbackEvent], grpc_context: Any
    ) -> fpb.SubmitSummary:
        return await self._feedback().servicer.SubmitStream(request_stream, grpc_context)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The policy application from its `args` (see the module docstring)."""
    cfg, ray_cfg = read_configs(PolicyConfig, args)
    prepare_server_config(cfg, ray_cfg)
    options = deployment_options(ray_cfg, cfg, max(cfg.max_batch_size, cfg.gen_max_batch_size))
    return PolicyDeployment.options(**options).bind(cfg, ray_cfg)  # type: ignore[attr-defined]


app = build_app
