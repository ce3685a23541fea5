"""A real policy service on loopback for tests: its config, start, clients and health check."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopserve.auth import read_token
from loopserve.client import AsyncClient, RetryPolicy
from loopserve.config import POLICY_SERVICE, PolicyConfig
from policy_service.app import PolicyApp

NO_RETRY = RetryPolicy(attempts=1)


def policy_config(data_dir: Path, **kw: object) -> PolicyConfig:
    """Ephemeral port, no metrics port, short inputs, a quick store watch; `kw` overrides."""
    base = PolicyConfig(
        data_dir=data_dir,
        port=0,
        metrics_port=-1,
        max_input_tokens=32,
        max_new_tokens_cap=32,
        watch_interval_s=0.2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


class Running:
    def __init__(self, app: PolicyApp) -> None:
        self.app = app
        self.port = app.port
        self.target = f"127.0.0.1:{app.port}"
        self.tokens = {r: read_token(app.cfg.token_path, r) for r in ("client", "annotator", "admin")}

    def client(self, role: str = "client", **kw: object) -> AsyncClient:
        """A client of `role` that never retries (a test sees each status as the server sent it)."""
        return AsyncClient(kw.pop("target", self.target), self.tokens[role], retry=NO_RETRY, **kw)  # type: ignore[arg-type]

    async def health(self, service: str = POLICY_SERVICE) -> int:
        async with aio.insecure_channel(self.target) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return r.status


async def start_policy(cfg: PolicyConfig) -> Running:
    app = PolicyApp(cfg)
    await app.start()
    return Running(app)
