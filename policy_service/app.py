"""Assemble and run the policy service process: runtime, frontend, servicers, server, metrics, drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from loopserve import metrics
from loopserve.config import FEEDBACK_SERVICE, POLICY_SERVICE, PolicyConfig
from loopserve.device import pick_device, pick_dtype
from loopserve.feedback.v1 import feedback_pb2_grpc
from loopserve.feedback_log import DecisionWriter, FeedbackCommitter, FeedbackLog, open_feedback_log
from loopserve.feedback_servicer import FeedbackIngest, FeedbackServicer
from loopserve.model_store import ModelStore
from loopserve.policy.v1 import policy_pb2_grpc
from loopserve.server import GrpcServer, ServiceBinding, admin_binding, serve_until_signalled, token_table
from policy_service.decisions import LoggedDecisions
from policy_service.exploration import rule_of
from policy_service.runtime import PolicyRuntime, RuntimeOptions
from policy_service.service import PolicyFrontend
from policy_service.servicer import PolicyServicer
from policy_service.shadow import ShadowAnnotator, shadow_policy_of

logger = logging.getLogger(__name__)


class PolicyApp:
    """The whole policy process minus the signal handling: what tests start on an ephemeral port."""

    def __init__(self, cfg: PolicyConfig, *, extra_bindings: Sequence[ServiceBinding] = ()) -> None:
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        # The feedback log: decisions are group-committed off the request path; feedback is
        # acknowledged once durable.
        self.log: FeedbackLog = open_feedback_log(cfg.feedback_log_url)
        self.decision_writer = DecisionWriter(self.log, capacity=cfg.decision_buffer)
        self.committer = FeedbackCommitter(self.log, decisions=self.decision_writer)
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
        # Read at scrape time: the writer drains its buffer off the request path, so a value set when
        # a request queued decisions would stay stale (at 1) once the stack is idle.
        writer = self.decision_writer
        metrics.QUEUE_DEPTH.labels("decisions").set_function(lambda: writer.pending)
        sink = LoggedDecisions(self.decision_writer, cfg.task) if cfg.log_decisions else None
        self.frontend = PolicyFrontend(cfg, self.runtime, sink)
        self.shadow = ShadowAnnotator(self.runtime, shadow_policy_of(cfg))
        self.frontend.shadow = self.shadow
        ingest = FeedbackIngest(self.committer, lambda: {cfg.task: self.frontend.label_set()})
        bindings = [
            ServiceBinding(
                POLICY_SERVICE,
                PolicyServicer(self.frontend),
                policy_pb2_grpc.add_PolicyServiceServicer_to_server,
            ),
            admin_binding(self.runtime.slots(), {self.shadow.model_name: self.shadow}),
            ServiceBinding(
                FEEDBACK_SERVICE,
                FeedbackServicer(ingest),
                feedback_pb2_grpc.add_FeedbackServiceServicer_to_server,
            ),
            *extra_bindings,
        ]
        self.server = GrpcServer(cfg, bindings, token_table(cfg))

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self, watch: bool = True) -> int:
        # Listen first (health NOT_SERVING) so probes see a live process while models load.
        port = await self.server.start()
        await self.frontend.start(watch=watch)
        await self.server.set_serving(True)
        logger.info("policy service ready on port %d (annotator %s)", port, self.runtime.annotator.current.version)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.drain(grace_s)
        await self.frontend.stop()
        # Everything acknowledged is already durable; this writes the decisions still buffered.
        self.committer.close()
        await asyncio.to_thread(self.decision_writer.close)
        self.log.close()


async def run(cfg: PolicyConfig) -> None:
    await serve_until_signalled(cfg, lambda: PolicyApp(cfg))
