"""The policy service as a Ray Serve application behind Ray's gRPC proxy (`policy_service.ray_app:app`).

The deployment wraps `PolicyRuntime` the way the grpc.aio servicer wraps it through `PolicyFrontend`,
with Ray's pieces in place of the embedded ones: `@serve.batch` instead of the DynamicBatcher, Ray's
replicas, autoscaling and bounded queues, and loopserve/ray_serve.py for auth, status codes, metrics
and the store watch. Same protos, same service names (`loopserve.policy.v1.PolicyService`, and
`loopserve.feedback.v1.FeedbackService` when a feedback log is configured); ModelAdmin is not exposed
(an admin call would reach one replica of many; replicas follow the store's LATEST).

    serve run policy_service.ray_app:app store_dir=/srv/store num_replicas=2   # or a Serve config
    loopserve serve --engine ray                                               # policy + reward

`app` is an application builder: Serve calls it with the application's `args` (PolicyConfig and
RayDeploymentConfig field names); what `args` leaves out comes from `LOOPSERVE_*` variables, then the
defaults. When several applications share the proxy, clients send metadata `application: policy`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from loopserve.config import FEEDBACK_SERVICE, POLICY_SERVICE, PolicyConfig
from loopserve.device import configure_threads, pick_device, pick_dtype
from loopserve.errors import FailedPrecondition
from loopserve.feedback.v1 import feedback_pb2 as fpb
from loopserve.model_slot import Loaded
from loopserve.model_store import ModelStore
from loopserve.policy.v1 import policy_pb2 as pb
from loopserve.ray_serve import (
    ReplicaMetrics,
    SlotWatch,
    client_id_of,
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
from loopserve.server import token_table
from policy_service.exploration import rule_of
from policy_service.runtime import GeneratorBundle, PolicyRuntime, RuntimeOptions
from policy_service.sampling import SequenceRequest
from policy_service.service import limits_of
from policy_service.types import (
    AnnotateCall,
    AnnotateResult,
    Annotation,
    Completion,
    GenerateCall,
    GenerateResult,
    ModelInfo,
    TokenDelta,
)

logger = logging.getLogger(__name__)

GenerateJob = tuple[GenerateCall, list[int], list[SequenceRequest]]


def _delta_pb(version: str, event_id: str, delta: TokenDelta) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        model_version=version,
        event_id=event_id,
        text=delta.text,
        logprob=delta.logprob,
        done=delta.done,
        finish_reason=delta.finish_reason,
        num_tokens=delta.num_tokens,
    )


@serve.deployment(name="policy")
class PolicyDeployment:
    """One replica: a PolicyRuntime, its store watch, its metrics endpoint, and (with `log_url`) the
    feedback log. Methods are named after the RPCs: Ray's proxy calls the one the client called."""

    async def __init__(self, cfg: PolicyConfig) -> None:  # type: ignore[misc]  # Ray awaits an async __init__
        configure_replica_logging(cfg.log_level)
        configure_threads(cfg.threads)
        self.cfg = cfg
        self.limits = limits_of(cfg)
        self.tokens = token_table(cfg)
        device = pick_device(cfg.device)
        self.runtime = PolicyRuntime(
            ModelStore(cfg.store_path),
            RuntimeOptions(
                device=device,
                dtype=pick_dtype(cfg.dtype, device),
                max_input_tokens=cfg.max_input_tokens,
                review_threshold=cfg.review_threshold,
                max_prompt_tokens=cfg.max_prompt_tokens,
                generator=cfg.generator,
                exploration=rule_of(cfg),
            ),
        )
        await asyncio.to_thread(self.runtime.load)
        self._model = model_executor("policy")
        self.annotate_batch.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
        self.annotate_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)  # type: ignore[attr-defined]
        self.generate_batch.set_max_batch_size(cfg.gen_max_batch_size)  # type: ignore[attr-defined]
        self.generate_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)  # type: ignore[attr-defined]
        self.watch = SlotWatch(self.runtime.slots().values(), cfg.watch_interval_s, cfg.watch_events)
        self.metrics = ReplicaMetrics.start(cfg.metrics_port, cfg.metrics_address)
        self.feedback = ReplicaFeedbackLog(cfg, self.runtime) if cfg.log_url else None
        self._closed = False
        logger.info("policy replica ready (annotator %s)", self.runtime.annotator.current.version)

    async def __call__(self, request: Any) -> Any:  # Ray's HTTP proxy: no HTTP API here, say so
        return await refuse_http(request)

    def check_health(self) -> None:
        if not self.runtime.healthy():
            raise RuntimeError("the policy models are not loaded")

    def __del__(self) -> None:
        """Ray calls this on a graceful shutdown (after in-flight requests); Python may call it again."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.watch.stop()
        if self.feedback is not None:
            self.feedback.close()  # writes the decisions still buffered
        if self.metrics is not None:
            self.metrics.close()
        self._model.shutdown(wait=False)

    # ---- batches (Ray's @serve.batch; sizes and waits come from the config in __init__) -----------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def annotate_batch(self, jobs: list[tuple[Loaded[Any], AnnotateCall]]) -> list[list[Annotation] | Exception]:
        return await run_pinned(self._model, self.runtime.annotate_batch, jobs, "annotate", lambda c: len(c.texts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate_batch(self, jobs: list[tuple[Loaded[Any], GenerateJob]]) -> list[list[Completion] | Exception]:
        return await run_pinned(self._model, self.runtime.generate_batch, jobs, "generate", lambda j: len(j[2]))

    # ---- PolicyService ----------------------------------------------------------------------------

    @rpc(POLICY_SERVICE, pb.AnnotateResponse)
    async def Annotate(self, request: pb.AnnotateRequest, grpc_context: Any) -> pb.AnnotateResponse:
        call = AnnotateCall.from_pb(request, self.limits, self.cfg.task)
        if self.feedback is not None:
            self.feedback.decisions.reserve(len(call.texts))
        handle = self.runtime.annotator.current  # pinned for the whole request
        result = AnnotateResult(handle.version, tuple(unwrap(await self.annotate_batch((handle, call)))))
        if self.feedback is not None:
            self.feedback.decisions.record_annotations(call, result, client_id_of(grpc_context))
        return result.to_pb()

    def _generator(self) -> Loaded[GeneratorBundle]:
        if self.runtime.generator is None:
            raise FailedPrecondition("this application runs without a generator (generator: false)")
        return self.runtime.generator.current

    @rpc(POLICY_SERVICE, pb.GenerateResponse)
    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:
        call = GenerateCall.from_pb(request, self.limits)
        if self.feedback is not None:
            self.feedback.decisions.reserve(call.n)
        handle = self._generator()
        ids = self.runtime.prompt_ids(handle, call)
        cancelled = threading.Event()
        seqs = self.runtime.sequence_requests(call, ids, cancelled=cancelled.is_set)
        try:
            comps = unwrap(await self.generate_batch((handle, (call, ids, seqs))))
        except asyncio.CancelledError:
            cancelled.set()  # a running batch drops the rows of a caller that went away
            raise
        result = GenerateResult(handle.version, tuple(comps))
        if self.feedback is not None:
            self.feedback.decisions.record_completions(call, result, client_id_of(grpc_context))
        return result.to_pb()

    @rpc(POLICY_SERVICE, pb.GenerateStreamResponse)
    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Tokens as they are decoded (the row rides in the same batches as Generate); the last
        message has done=True and the event_id."""
        call = GenerateCall.from_pb(request, self.limits, stream=True)
        if self.feedback is not None:
            self.feedback.decisions.reserve(1)
        handle = self._generator()
        ids = self.runtime.prompt_ids(handle, call)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        cancelled = threading.Event()
        seqs = self.runtime.sequence_requests(
            call,
            ids,
            on_token=lambda d: loop.call_soon_threadsafe(queue.put_nowait, d),  # decode thread -> loop
            cancelled=cancelled.is_set,
        )
        job = asyncio.ensure_future(self.generate_batch((handle, (call, ids, seqs))))
        final: TokenDelta | None = None
        try:
            while final is None:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break  # the batch ended (or failed) without a final delta
                delta = getter.result()
                if delta.done:
                    final = delta
                else:
                    yield _delta_pb(handle.version, "", delta)
            comps = unwrap(await job)  # raises this request's error, if any
            while not queue.empty():
                delta = queue.get_nowait()
                if delta.done:
                    final = delta
                else:
                    yield _delta_pb(handle.version, "", delta)
            c = comps[0]
            final = final or TokenDelta("", 0.0, True, c.finish_reason, c.num_tokens)
            if self.feedback is not None:
                result = GenerateResult(handle.version, tuple(comps))
                self.feedback.decisions.record_completions(call, result, client_id_of(grpc_context))
            yield _delta_pb(handle.version, c.event_id, final)
        finally:
            cancelled.set()
            if not job.done():
                job.cancel()

    @rpc(POLICY_SERVICE, pb.ModelInfo)
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context: Any) -> pb.ModelInfo:
        ann = self.runtime.annotator.current
        gen = self.runtime.generator.current.version if self.runtime.generator is not None else ""
        return ModelInfo(
            task=self.cfg.task,
            labels=[(lb.name, lb.description) for lb in ann.model.model.spec.labels],
            annotator_version=ann.version,
            generator_version=gen,
            limits=self.limits,
            max_input_tokens=self.cfg.max_input_tokens,
            review_threshold=self.cfg.review_threshold,
            device=str(self.runtime.opts.device),
        ).to_pb()

    # ---- FeedbackService (with log_url) -----------------------------------------------------------

    def _feedback(self) -> ReplicaFeedbackLog:
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


class ReplicaFeedbackLog:
    """The feedback log as one replica uses it: decisions go out through the service's own decision
    sink (group-committed off the request path), feedback comes in through the service's own
    FeedbackService logic (acknowledged once durable). Replicas on several nodes need PostgreSQL."""

    def __init__(self, cfg: PolicyConfig, runtime: PolicyRuntime) -> None:
        from loopserve.feedback_log import DecisionWriter, FeedbackCommitter, open_feedback_log
        from loopserve.feedback_servicer import FeedbackIngest, FeedbackServicer
        from policy_service.decisions import LoggedDecisions

        self.log = open_feedback_log(cfg.log_url)
        self.writer = DecisionWriter(self.log, capacity=cfg.decision_buffer)
        self.committer = FeedbackCommitter(self.log, decisions=self.writer)
        self.decisions = LoggedDecisions(self.writer, cfg.task)
        ingest = FeedbackIngest(self.committer, lambda: {cfg.task: runtime.annotator.current.model.labels})
        self.servicer = FeedbackServicer(ingest)

    def close(self) -> None:
        self.committer.close()
        self.writer.close()
        self.log.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """The policy application from its `args` (see the module docstring)."""
    cfg, ray_cfg = read_configs(PolicyConfig, args)
    prepare_server_config(cfg, ray_cfg)
    options = deployment_options(ray_cfg, cfg, max(cfg.max_batch_size, cfg.gen_max_batch_size))
    return PolicyDeployment.options(**options).bind(cfg)  # type: ignore[attr-defined]


app = build_app
