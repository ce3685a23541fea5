"""Assemble and run the policy service process: runtime, frontend, servicers, server, metrics, drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from loopserve.config import FEEDBACK_SERVICE, POLICY_SERVICE, PolicyConfig
from loopserve.feedback.v1 import feedback_pb2_grpc
from loopserve.models.store import ModelStore
from loopserve.policy.v1 import policy_pb2_grpc
from loopserve.serving.server import GrpcServer, ServiceBinding, admin_binding, serve_until_signalled, token_table
from policy_service.decisions import PolicyLog
from policy_service.frontend import PolicyFrontend
from policy_service.runtime import PolicyRuntime, RuntimeOptions
from policy_service.servicer import PolicyServicer
from policy_service.shadow import ShadowAnnotator, shadow_policy_of

logger = logging.getLogger(__name__)


class PolicyApp:
    """The whole policy process minus the signal handling: what tests start on an ephemeral port."""

    def __init__(self, cfg: PolicyConfig, *, extra_bindings: Sequence[ServiceBinding] = ()) -> None:
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = PolicyRuntime(ModelStore(cfg.store_path), RuntimeOptions.of(cfg))
        self.feedback_log = PolicyLog(cfg, lambda: self.frontend.label_set())
        self.frontend = PolicyFrontend(cfg, self.runtime, self.feedback_log.decisions)
        self.shadow = ShadowAnnotator(self.runtime, shadow_policy_of(cfg))
        self.frontend.shadow = self.shadow
        bindings = [
            ServiceBinding(
                POLICY_SERVICE,
                PolicyServicer(self.frontend),
                policy_pb2_grpc.add_PolicyServiceServicer_to_server,
            ),
            admin_binding(self.runtime.slots(), {self.shadow.model_name: self.shadow}),
            ServiceBinding(
                FEEDBACK_SERVICE,
                self.feedback_log.servicer,
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
        await asyncio.to_thread(self.feedback_log.close)


async def run(cfg: PolicyConfig) -> None:
    await serve_until_signalled(cfg, lambda: PolicyApp(cfg))
