"""Ray Serve replica glue shared by the policy and reward deployments (policy_service/ray_app.py,
reward_service/ray_app.py). Starting Ray and the `serve` command live in loopserve/cli/serve.py.

What the grpc.aio server does with interceptors, a Ray replica does here, per method:

- `rpc(service, empty)`: the bearer-token check of loopserve.auth on the metadata Ray hands the replica,
  domain errors (loopserve.errors) mapped to status codes on Ray's gRPC context by the same mapping as
  the interceptor (`set_code` / `set_details`: Ray has no server interceptors), and the request metrics.
- `ServeBatcher`: the Batcher protocol over a `@serve.batch` method, so that the deployments run the
  same Frontend and servicers as the embedded server; `run_pinned` is the body of such a method:
  requests carry the `Loaded` version they were admitted under, a batch runs once per version (never
  mixing two), on the replica's model thread.
- `ReplicaMetrics`: loopserve's Prometheus registry on `metrics_port + 10 * local rank` of each replica
  (two replicas of one deployment on a node do not collide).
- `RayDeploymentConfig`, `read_configs`, `deployment_options`: replicas, autoscaling and fractional
  CPU/GPU from flags, the environment or the Serve config's `args`.

Importing this module imports neither ray, torch nor grpc (the CLI imports it to build its parser).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import logging
import threading
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from loopserve import auth
from loopserve.config import ServerConfig, flags_of, parse

if TYPE_CHECKING:  # grpc, prometheus and the slot load in replicas, not when the CLI builds its parser
    import grpc

    from loopserve.models.slot import Loaded

logger = logging.getLogger(__name__)

# The servicers Ray's gRPC proxy registers (k8s/overlays/ray and deploy/ray/serve_config.yaml name the
# same): the services' own, ModelAdmin, and grpc.health.v1 (answered by the deployment, so that
# readiness checks and probes read the same as on the embedded server).
GRPC_SERVICER_FUNCTIONS = [
    "loopserve.policy.v1.policy_pb2_grpc.add_PolicyServiceServicer_to_server",
    "loopserve.feedback.v1.feedback_pb2_grpc.add_FeedbackServiceServicer_to_server",
    "loopserve.reward.v1.reward_pb2_grpc.add_RewardServiceServicer_to_server",
    "loopserve.admin.v1.admin_pb2_grpc.add_ModelAdminServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
METRICS_PORT_STRIDE = 10  # replica k of a deployment on a node serves /metrics on base + 10 * k

C = TypeVar("C")
M = TypeVar("M")
X = TypeVar("X")
Y = TypeVar("Y")


# ---- configuration ----------------------------------------------------------------------------------


@dataclass
class RayDeploymentConfig:
    """How many replicas, and what each reserves. Flags `--num-replicas` ..., environment
    `LOOPSERVE_NUM_REPLICAS` ..., or keys of an application's `args` in a Serve config. A Serve
    config's `deployments:` entries override these (Ray applies them last)."""

    num_replicas: int = 1
    """replicas per deployment (without --autoscale)"""
    autoscale: bool = False
    """let Serve scale replicas on ongoing requests"""
    min_replicas: int = 1
    """autoscaling: fewest replicas"""
    max_replicas: int = 4
    """autoscaling: most replicas"""
    target_ongoing_requests: float = 32.0
    """autoscaling: requests in flight per replica to aim for"""
    num_cpus: float = 1.0
    """CPUs each replica reserves (fractions allowed)"""
    num_gpus: float = 0.0
    """GPUs each replica reserves (fractions allowed)"""
    max_ongoing_requests: int = 0
    """requests a replica takes at once; 0: twice the batch size"""
    batching: Literal["loopserve", "serve"] = "loopserve"
    """loopserve: each replica runs the embedded server's batchers (a batch forms while the model is busy;
    continuous batching for generation); serve: Ray's @serve.batch, which starts a batch every max_wait_ms
    even while the last one still runs (small batches under load: bench/serving_ray.py measures both)"""


def read_configs(
    cls: type[C], args: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[C, RayDeploymentConfig]:
    """The service config and the deployment config from an application's `args` (keys are field
    names, e.g. `store_dir`, `num_replicas`), then `LOOPSERVE_*` variables, then the defaults: the same
    reader as every process's flags (loopserve.config.parse), the `args` turned into flags."""
    own = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    deployment = {f.name for f in dataclasses.fields(RayDeploymentConfig)}
    unknown = sorted(set(args) - own - deployment)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known: {sorted(own | deployment)}")
    mine = {k: v for k, v in args.items() if k in own}
    ray = {k: v for k, v in args.items() if k in deployment}
    cfg = parse(cls, flags_of(cls, mine), environ=environ, prog="application args")
    return cfg, parse(RayDeploymentConfig, flags_of(RayDeploymentConfig, ray), environ=environ, prog="application args")


def prepare_server_config(cfg: ServerConfig, ray_cfg: RayDeploymentConfig) -> ServerConfig:
    """Fix, once and before any replica starts, what replicas must agree on: absolute paths (replicas
    may run in another directory), the token file (made here, so that replicas never race to create
    it), and torch threads (the CPUs a replica reserves, unless `threads` says otherwise)."""
    cfg.data_dir = cfg.data_dir.resolve()
    if cfg.store_dir is not None:
        cfg.store_dir = cfg.store_dir.resolve()
    if cfg.auth:
        if cfg.token_file is None:
            auth.ensure_token_file(cfg.token_path)
        cfg.token_file = cfg.token_path.resolve()
    if cfg.threads == 0:
        cfg.threads = max(1, int(ray_cfg.num_cpus))
    return cfg


def deployment_options(ray_cfg: RayDeploymentConfig, cfg: ServerConfig, max_batch_size: int) -> dict[str, Any]:
    """`Deployment.options(...)` from the configs: replicas or autoscaling, fractional CPU / GPU, and
    bounded queues (`max_queued_requests`: RESOURCE_EXHAUSTED past it, never an unbounded queue)."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray_cfg.num_cpus, "num_gpus": ray_cfg.num_gpus},
        # @serve.batch can only fill a batch from requests the replica has taken.
        "max_ongoing_requests": ray_cfg.max_ongoing_requests or 2 * max_batch_size,
        "max_queued_requests": cfg.max_queue,
        "graceful_shutdown_timeout_s": cfg.grace_s,
    }
    if ray_cfg.autoscale:
        opts["autoscaling_config"] = {
            "min_replicas": ray_cfg.min_replicas,
            "max_replicas": ray_cfg.max_replicas,
            "target_ongoing_requests": ray_cfg.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = ray_cfg.num_replicas
    return opts


# ---- per request: auth, status codes, metrics --------------------------------------------------------


class RayGrpcContext(typing.Protocol):
    """What loopserve uses of `ray.serve.grpc_util.RayServegRPCContext`."""

    def invocation_metadata(self) -> list[tuple[str, str]]: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...


def metadata_of(grpc_context: RayGrpcContext) -> dict[str, str]:
    return {k: v for k, v in grpc_context.invocation_metadata() or () if isinstance(v, str)}


def client_id_of(grpc_context: RayGrpcContext) -> str:
    """The caller's self-declared id (metadata `x-client-id`), for the decision log."""
    return metadata_of(grpc_context).get("x-client-id", "")[:128]


def set_status(grpc_context: RayGrpcContext, exc: BaseException) -> grpc.StatusCode:
    """Put the status code and message of `exc` on Ray's context (the one error mapping)."""
    from loopserve.serving.interceptors import status_of

    code, message = status_of(exc)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    return code


def rpc(service: str, empty: Callable[[], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a deployment method named after an RPC of `service`.

    The method takes `(self, request, grpc_context)`; `self.tokens` is the `TokenTable` (None: auth
    off). A unary method that fails sets the status on the context and returns `empty()` (Ray sends
    the status; the client never sees the message). A streaming method (an async generator) sets the
    status and re-raises: Ray carries a status set before an exception to the client.
    """

    import grpc

    from loopserve import metrics

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        method = fn.__name__
        full_method = f"/{service}/{method}"

        def finish(start: float, code: grpc.StatusCode) -> None:
            metrics.REQUESTS.labels(service, method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(service, method).observe(time.perf_counter() - start)

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def streaming(self: Any, request: Any, grpc_context: RayGrpcContext) -> AsyncIterator[Any]:
                start = time.perf_counter()
                try:
                    if self.tokens is not None:
                        auth.authorize(self.tokens, full_method, metadata_of(grpc_context))
                    async for response in fn(self, request, grpc_context):
                        yield response
                except asyncio.CancelledError:
                    finish(start, grpc.StatusCode.CANCELLED)
                    raise
                except Exception as exc:
                    finish(start, set_status(grpc_context, exc))
                    raise
                finish(start, grpc.StatusCode.OK)

            return streaming

        @functools.wraps(fn)
        async def unary(self: Any, request: Any, grpc_context: RayGrpcContext) -> Any:
            start = time.perf_counter()
            try:
                if self.tokens is not None:
                    auth.authorize(self.tokens, full_method, metadata_of(grpc_context))
                response = await fn(self, request, grpc_context)
            except asyncio.CancelledError:
                finish(start, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                finish(start, set_status(grpc_context, exc))
                return empty()
            finish(start, grpc.StatusCode.OK)
            return response

        return unary

    return decorate


# ---- per batch: one model version, on the model thread ----------------------------------------------


def model_executor(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread a replica runs model batches on (torch uses its intra-op threads inside)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-model")


async def run_pinned(
    executor: concurrent.futures.Executor,
    run_batch: Callable[[Loaded[M], list[X]], Sequence[Y]],
    jobs: Sequence[tuple[Loaded[M], X]],
    batch_label: str,
    size: Callable[[X], int] = lambda _: 1,
) -> list[Y]:
    """The body of a `@serve.batch` method: `jobs` are (version the request was admitted under,
    request); `run_batch` runs once per version among them, on `executor`, results in job order.
    `batch_label` and `size` feed `loopserve_batch_size` as the embedded batcher does (items)."""
    from loopserve import metrics

    loop = asyncio.get_running_loop()
    groups: dict[int, list[int]] = {}
    for i, (handle, _) in enumerate(jobs):
        groups.setdefault(id(handle), []).append(i)
    out: list[Any] = [None] * len(jobs)
    for idx in groups.values():
        handle = jobs[idx[0]][0]
        requests = [jobs[i][1] for i in idx]
        metrics.BATCH_SIZE.labels(batch_label).observe(sum(size(r) for r in requests))
        results = await loop.run_in_executor(executor, run_batch, handle, requests)
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out


HTTP_REFUSAL = (
    "loopserve speaks gRPC: call this application through Ray Serve's gRPC proxy with `application` "
    "metadata (docs/ray.md); there is no HTTP API on this route\n"
)


async def refuse_http(request: Any) -> Any:
    """What an application answers on Ray's HTTP proxy (its route exists; a deployment without
    `__call__` would answer 500): 404 and where to go instead."""
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(HTTP_REFUSAL, status_code=404)


def unwrap(result: Y | BaseException) -> Y:
    """A `@serve.batch` result: the request's own answer, or raise its own error (Ray hands back an
    exception result as is; `run_batch` isolates each request's failure from the rest of its batch)."""
    if isinstance(result, BaseException):
        raise result
    return result


# ---- per replica: hot-swap watch, metrics, logging ---------------------------------------------------


class ServeBatcher(Generic[X, Y]):
    """The Batcher protocol (loopserve/serving/batcher.py) over a deployment's `@serve.batch` method:
    Ray forms the batches (sizes and waits are set in the replica's __init__), and the Frontend submits
    to it exactly as it submits to the embedded DynamicBatcher. `batch` takes one (pinned version,
    request) job and returns that request's answer or its own error (`run_pinned`)."""

    def __init__(self, batch: Callable[[tuple[Any, X]], Awaitable[Y | BaseException]]) -> None:
        self._batch = batch

    def start(self) -> None:
        """Ray runs the batch loop."""

    async def stop(self) -> None:
        """Ray drains in-flight requests before it shuts a replica down."""

    async def submit(self, key: Any, request: X, size: int = 1) -> Y:
        return unwrap(await self._batch((key, request)))


def serve_batching(ray_cfg: RayDeploymentConfig) -> bool:
    """Whether a replica batches with Ray's `@serve.batch` (else: the Frontend's own batchers)."""
    return ray_cfg.batching == "serve"


def single_replica(ray_cfg: RayDeploymentConfig) -> bool:
    """Whether the deployment runs exactly one replica (then an admin call reaches all of it)."""
    return not ray_cfg.autoscale and ray_cfg.num_replicas == 1


class ReplicaAdmin:
    """ModelAdmin in a replica: the embedded server's servicer over the replica's slots. Reading
    (ListVersions) is always allowed; a call that changes what is served only while the deployment has
    one replica, since the proxy hands an admin call to one replica of many. With several, move the
    store's LATEST (`loopserve models publish` / `rollback`): every replica follows it."""

    def __init__(self, slots: Mapping[str, Any], writable: bool) -> None:
        from loopserve.serving.admin import ModelAdminServicer

        self.servicer = ModelAdminServicer(slots)
        self._writable = writable

    def writable(self) -> Any:
        from loopserve.errors import FailedPrecondition

        if not self._writable:
            raise FailedPrecondition(
                "this application runs several replicas and an admin call would reach only one: "
                "publish or roll back the store's LATEST instead (every replica follows it)"
            )
        return self.servicer


class ReplicaHealth:
    """grpc.health.v1 as a deployment answers it through Ray's proxy: SERVING while `healthy()`, the
    same answer the embedded server gives (no token needed, as there: probes carry none)."""

    WATCH_INTERVAL_S = 1.0

    def __init__(self, healthy: Callable[[], bool]) -> None:
        self.healthy = healthy

    def status(self) -> Any:
        from grpc_health.v1 import health_pb2

        ok = self.healthy()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def watch(self) -> AsyncIterator[Any]:
        """The current status, then each change (polled: a replica's health changes rarely)."""
        last = self.status()
        yield last
        while True:
            await asyncio.sleep(self.WATCH_INTERVAL_S)
            now = self.status()
            if now.status != last.status:
                last = now
                yield now


def replica_local_rank() -> int:
    """This replica's rank among its deployment's replicas on this node (0 outside a replica)."""
    try:
        from ray import serve

        rank = serve.get_replica_context().rank
    except Exception:  # not in a replica (a unit test, a script)
        return 0
    return int(getattr(rank, "local_rank", 0) or 0)


class ReplicaMetrics:
    """loopserve's Prometheus registry over HTTP from one replica process."""

    def __init__(self, server: Any, thread: threading.Thread, port: int) -> None:
        self._server = server
        self._thread = thread
        self.port = port

    @classmethod
    def start(cls, base_port: int, host: str = "0.0.0.0") -> ReplicaMetrics | None:
        """Serve /metrics on `base_port + 10 * local rank`; None when disabled (negative port) or the
        port is taken (logged: the replica serves on without its metrics endpoint)."""
        if base_port < 0:
            return None
        from prometheus_client import REGISTRY, start_http_server

        port = base_port + METRICS_PORT_STRIDE * replica_local_rank() if base_port else 0
        try:
            server, thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:
            logger.warning("replica metrics: port %d is not free (%s); /metrics is off here", port, exc)
            return None
        port = server.server_address[1]
        logger.info("replica metrics on port %d", port)
        return cls(server, thread, port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def configure_replica_logging(level: str) -> None:
    """Ray sets up the root handler in a replica; loopserve's loggers only need their level."""
    for name in ("loopserve", "policy_service", "reward_service"):
        logging.getLogger(name).setLevel(level.upper())
