"""Assemble and run the reward service process: runtime, frontend, servicers, server, metrics, drain."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from loopserve.config import REWARD_SERVICE, RewardConfig
from loopserve.models.store import ModelStore
from loopserve.reward.v1 import reward_pb2_grpc
from loopserve.serving.server import GrpcServer, ServiceBinding, admin_binding, serve_until_signalled, token_table
from reward_service.frontend import RewardFrontend
from reward_service.runtime import RewardRuntime, RuntimeOptions
from reward_service.servicer import RewardServicer

logger = logging.getLogger(__name__)


class RewardApp:
    """The whole reward process minus the signal handling: what tests start on an ephemeral port."""

    def __init__(self, cfg: RewardConfig, *, extra_bindings: Sequence[ServiceBinding] = ()) -> None:
        self.cfg = cfg
        self.runtime = RewardRuntime(ModelStore(cfg.store_path), RuntimeOptions.of(cfg))
        self.frontend = RewardFrontend(cfg, self.runtime)
        bindings = [
            ServiceBinding(
                REWARD_SERVICE,
                RewardServicer(self.frontend),
                reward_pb2_grpc.add_RewardServiceServicer_to_server,
            ),
            admin_binding(self.runtime.slots()),
            *extra_bindings,
        ]
        self.server = GrpcServer(cfg, bindings, token_table(cfg))

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self, watch: bool = True) -> int:
        # Listen first (health NOT_SERVING) so probes see a live process while the model loads.
        port = await self.server.start()
        await self.frontend.start(watch=watch)
        await self.server.set_serving(True)
        logger.info("reward service ready on port %d (reward %s)", port, self.runtime.reward.current.version)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.drain(grace_s)
        await self.frontend.stop()


async def run(cfg: RewardConfig) -> None:
    await serve_until_signalled(cfg, lambda: RewardApp(cfg))
