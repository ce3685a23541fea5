"""Server bootstrap shared by the policy and reward services: a grpc.aio server with the status and
auth interceptors, grpc.health.v1, server reflection, optional TLS / mTLS, and a graceful drain.

Drain (grpc's async_greeter_server_with_graceful_shutdown): on SIGTERM, health goes NOT_SERVING so load
balancers stop sending, the server stops taking new calls, in-flight calls get `grace_s` to finish,
then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loopserve import auth, heap
from loopserve.config import ServerConfig
from loopserve.serving.interceptors import AuthInterceptor, StatusInterceptor

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and the generated function that registers it, under its full service name."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, aio.Server], None]


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None and cfg.tls_key is None:
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def token_table(cfg: ServerConfig) -> auth.TokenTable | None:
    """None means auth is off (--no-auth, development only)."""
    if not cfg.auth:
        logger.warning("AUTH IS OFF (--no-auth): anyone who reaches this port can call every method, admin too")
        return None
    if cfg.token_file is None:  # the embedded default: make one
        return auth.ensure_token_file(cfg.token_path)
    table = auth.load_tokens(cfg.token_path)
    if not table.tokens:
        raise ValueError(f"no tokens in {cfg.token_path} or ${auth.TOKENS_ENV}")
    return table


class GrpcServer:
    """Owns the aio server and its health servicer."""

    def __init__(
        self,
        cfg: ServerConfig,
        bindings: Sequence[ServiceBinding],
        tokens: auth.TokenTable | None,
    ) -> None:
        self.cfg = cfg
        self.bindings = list(bindings)
        interceptors: list[aio.ServerInterceptor] = [StatusInterceptor()]
        if tokens is not None:
            interceptors.append(AuthInterceptor(tokens))
        self.server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for b in self.bindings:
            b.add_to_server(b.servicer, self.server)
        names = [b.name for b in self.bindings] + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        self.port = 0

    async def start(self) -> int:
        address = f"{self.cfg.host}:{self.cfg.port}"
        creds = server_credentials(self.cfg)
        if creds is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await self.set_serving(False)
        await self.server.start()
        logger.info("listening on %s:%d (tls=%s)", self.cfg.host, self.port, creds is not None)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self.health.set("", status)
        for b in self.bindings:
            await self.health.set(b.name, status)

    async def drain(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, give in-flight ones `grace_s`, then stop."""
        grace = self.cfg.grace_s if grace_s is None else grace_s
        logger.info("draining: grace %.1fs", grace)
        await self.set_serving(False)
        await self.server.stop(grace)


class ServiceProcess(Protocol):
    """What `serve_until_signalled` runs: PolicyApp, RewardApp."""

    async def start(self, watch: bool = True) -> int: ...

    async def stop(self, grace_s: float | None = None) -> None: ...


def admin_binding(slots: Mapping[str, Any], shadows: Mapping[str, Any] | None = None) -> ServiceBinding:
    """ModelAdmin over a service's model slots (the same servicer in both services), and its shadows."""
    from loopserve.admin.v1 import admin_pb2_grpc
    from loopserve.config import ADMIN_SERVICE
    from loopserve.serving.admin import ModelAdminServicer

    return ServiceBinding(
        ADMIN_SERVICE, ModelAdminServicer(slots, shadows), admin_pb2_grpc.add_ModelAdminServicer_to_server
    )


async def serve_until_signalled(cfg: ServerConfig, make_app: Callable[[], ServiceProcess]) -> None:
    """A service process's main: threads, /metrics, start, wait for SIGTERM/SIGINT, drain, exit 0."""
    from loopserve import metrics
    from loopserve.device import configure_threads

    configure_threads(cfg.threads)
    metrics.serve_metrics(cfg.metrics_port, cfg.metrics_address)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    app = make_app()
    await app.start()
    frozen = heap.freeze_startup_objects()  # full collections no longer walk them (loopserve.heap)
    logger.debug("froze %d startup objects", frozen)
    await stop.wait()
    await app.stop()


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
