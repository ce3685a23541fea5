"""Ray Serve glue shared by the policy and reward applications (policy_service/ray_app.py,
reward_service/ray_app.py), and the `loopserve serve --engine ray` command.

What the grpc.aio server does with interceptors, a Ray replica does here, per method:

- `rpc(service, empty)`: the bearer-token check of loopserve.auth on the metadata Ray hands the replica,
  domain errors (loopserve.errors) mapped to status codes on Ray's gRPC context by the same mapping as
  the interceptor (`set_code` / `set_details`: Ray has no server interceptors), and the request metrics.
- `run_pinned`: the body of a `@serve.batch` method: requests carry the `Loaded` version they were
  admitted under, a batch runs once per version (never mixing two), on the replica's model thread.
- `SlotWatch`: every replica polls the shared store's LATEST with its own `ModelSlot`s (hot-swap).
- `serve_replica_metrics`: loopserve's Prometheus registry on `metrics_port + 10 * local rank` of
  each replica (two replicas of one deployment on a node do not collide).
- `RayDeploymentConfig`, `read_configs`, `deployment_options`: replicas, autoscaling and fractional
  CPU/GPU from flags, the environment or the Serve config's `args`.

Importing this module imports neither ray, torch nor grpc (the CLI imports it to build its parser).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import signal
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loopserve import auth
from loopserve.config import (
    PolicyConfig,
    RewardConfig,
    ServerConfig,
    _base_type,
    add_arguments,
    from_namespace,
)

if TYPE_CHECKING:  # grpc, prometheus and the slot load in replicas, not when the CLI builds its parser
    import grpc

    from loopserve.model_slot import Loaded, ModelSlot

logger = logging.getLogger(__name__)

# The servicers Ray's gRPC proxy registers (k8s/overlays/ray and deploy/ray/serve_config.yaml name the
# same). ModelAdmin is not among them: on a shared proxy an admin call would reach one replica of many.
GRPC_SERVICER_FUNCTIONS = [
    "loopserve.policy.v1.policy_pb2_grpc.add_PolicyServiceServicer_to_server",
    "loopserve.feedback.v1.feedback_pb2_grpc.add_FeedbackServiceServicer_to_server",
    "loopserve.reward.v1.reward_pb2_grpc.add_RewardServiceServicer_to_server",
]
DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000
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

    num_replicas: int = field(default=1, metadata={"help": "replicas per deployment (without --autoscale)"})
    autoscale: bool = field(default=False, metadata={"help": "let Serve scale replicas on ongoing requests"})
    min_replicas: int = field(default=1, metadata={"help": "autoscaling: fewest replicas"})
    max_replicas: int = field(default=4, metadata={"help": "autoscaling: most replicas"})
    target_ongoing_requests: float = field(
        default=32.0, metadata={"help": "autoscaling: requests in flight per replica to aim for"}
    )
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs each replica reserves (fractions allowed)"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs each replica reserves (fractions allowed)"})
    max_ongoing_requests: int = field(
        default=0, metadata={"help": "requests a replica takes at once; 0: twice the batch size"}
    )


def _convert(value: Any, tp: Any, name: str) -> Any:
    if tp is bool and isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    try:
        return tp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from exc


def _from_args(cls: type[C], args: Mapping[str, Any], environ: Mapping[str, str] | None) -> C:
    hints = typing.get_type_hints(cls)
    given = {
        f.name: _convert(args[f.name], _base_type(hints[f.name]), f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if args.get(f.name) is not None
    }
    return from_namespace(cls, argparse.Namespace(**given), dict(os.environ if environ is None else environ))


def read_configs(
    cls: type[C], args: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[C, RayDeploymentConfig]:
    """The service config and the deployment config from an application's `args` (keys are field
    names, e.g. `store_dir`, `num_replicas`), then `LOOPSERVE_*` variables, then the defaults."""
    known = {f.name for f in dataclasses.fields(cls)} | {  # type: ignore[arg-type]
        f.name for f in dataclasses.fields(RayDeploymentConfig)
    }
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known: {sorted(known)}")
    cfg = _from_args(cls, args, environ)
    ray_cfg = _from_args(RayDeploymentConfig, args, environ)
    return cfg, ray_cfg


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
    from loopserve.interceptors import status_of

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


class SlotWatch:
    """Watches the store's LATEST for every slot of a replica (create inside the replica's event loop):
    file-system events, and polling every `interval_s` as the fallback."""

    def __init__(self, slots: Iterable[ModelSlot[Any]], interval_s: float, events: bool = True) -> None:
        self.slots = list(slots)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(slot.watch(interval_s, self._stop, events=events)) for slot in self.slots]

    def stop(self) -> None:
        """Stop polling (a load under way finishes on the slot's loader thread)."""
        self._stop.set()


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


# ---- starting Ray Serve (tests, bench and the CLI) ---------------------------------------------------


def start_serve(
    *,
    grpc_port: int = DEFAULT_GRPC_PORT,
    http_port: int = DEFAULT_HTTP_PORT,
    host: str = "127.0.0.1",
    address: str | None = None,
    num_cpus: int | None = None,
    temp_dir: Path | None = None,
    object_store_bytes: int | None = 200 * 1024 * 1024,
    log_to_driver: bool = True,
) -> None:
    """Start (or join, with `address`) a Ray cluster and Serve's proxies with loopserve's gRPC servicers.

    A local cluster gets no dashboard, `num_cpus` CPUs, a small object store (the apps pass protos,
    not tensors), and its session files under `temp_dir`.
    """
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            for attempt in (1, 2):
                try:
                    ray.init(
                        num_cpus=num_cpus,
                        include_dashboard=False,
                        _temp_dir=str(temp_dir) if temp_dir else None,
                        object_store_memory=object_store_bytes,
                        log_to_driver=log_to_driver,
                    )
                    break
                except Exception as exc:  # Ray raises a bare Exception when its raylet misses its
                    ray.shutdown()  # 30 s start-up window (cold imports on a busy machine): once more
                    if attempt == 2:
                        raise
                    logger.warning("the local Ray cluster did not start (%s); trying once more", exc)
    serve.start(
        http_options={"host": host, "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )


def deploy(apps: Mapping[str, Any]) -> None:
    """Run each application under its name (what callers send as `application` metadata)."""
    from ray import serve

    for name, app in apps.items():
        serve.run(app, name=name, route_prefix=f"/{name}")
        logger.info("application %s is running", name)


def stop_serve(*, end_children: bool = False, helper_grace_s: float = 10.0) -> None:
    """Shut Serve and Ray down (replicas get their graceful shutdown; safe to call twice).

    `ray.shutdown()` leaves some helpers of a local cluster running (the dashboard agent, the runtime
    env agent). With `end_children` (the `serve` command, whose only children are Ray's), every
    process this one started that is still alive `helper_grace_s` later gets SIGTERM, then SIGKILL."""
    import psutil
    import ray
    from ray import serve

    started = psutil.Process().children(recursive=True) if end_children else []
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    if not started:
        return
    _, alive = psutil.wait_procs(started, timeout=helper_grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=5.0)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if alive:
        logger.warning("killed %d Ray helper processes that outlived SIGTERM", len(alive))


def build_apps(names: Sequence[str], args: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """name -> Serve application, from each service's builder and its args."""
    apps: dict[str, Any] = {}
    for name in names:
        if name == "policy":
            from policy_service.ray_app import build_app as build_policy

            apps[name] = build_policy(dict(args.get(name, {})))
        elif name == "reward":
            from reward_service.ray_app import build_app as build_reward

            apps[name] = build_reward(dict(args.get(name, {})))
        else:
            raise ValueError(f"unknown application {name!r} (policy, reward)")
    return apps


# ---- `loopserve serve` -------------------------------------------------------------------------------

# Flags of the embedded servers that Ray's gRPC proxy cannot honour: it listens itself (--grpc-port,
# --proxy-host) and has no TLS option (end TLS at the ingress in front of it). `serve --engine ray`
# refuses them rather than ignore them.
_NOT_ON_RAY = {"host", "port", "tls_cert", "tls_key", "tls_client_ca"}
# Shadow mode lives in the embedded policy service only (policy_service/shadow.py): refused too.
_SHADOW_FLAGS = {"shadow_fraction", "shadow_promote_agreement", "shadow_min_items"}


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """`loopserve serve --engine ray|embedded`: the policy and reward services (no trainer)."""
    p = sub.add_parser(
        "serve",
        help="the policy and reward services: embedded gRPC servers, or Ray Serve behind its gRPC proxy",
    )
    p.add_argument("--engine", choices=("embedded", "ray"), default="embedded")
    p.add_argument("--apps", default="policy,reward", help="ray: applications to deploy (policy, reward)")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="ray: the gRPC proxy's port")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="ray: the HTTP proxy's port")
    p.add_argument(
        "--proxy-host",
        default="127.0.0.1",
        help="ray: the HTTP proxy's address, and where replicas serve /metrics unless --metrics-host says "
        "otherwise (Ray Serve 2.60's gRPC proxy always listens on every interface: firewall --grpc-port)",
    )
    p.add_argument("--address", default=None, help="ray: join this cluster (e.g. auto) instead of starting one")
    p.add_argument("--cluster-cpus", type=int, default=None, help="ray: CPUs of a local cluster (default: all)")
    add_arguments(p, PolicyConfig)  # ray refuses the flags in _NOT_ON_RAY; embedded uses them all
    seen = {f.name for f in dataclasses.fields(PolicyConfig)}
    add_arguments(p, RewardConfig, skip=seen)
    add_arguments(p, RayDeploymentConfig)
    p.set_defaults(fn=cmd_serve)
    return p


def _flag_args(ns: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    return {
        f.name: getattr(ns, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in _NOT_ON_RAY | _SHADOW_FLAGS and getattr(ns, f.name, None) is not None
    }


def ray_app_args(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each application's `args` from the `serve` flags. Replicas serve /metrics on --proxy-host unless
    --metrics-host says otherwise; one --metrics-port is the policy's base, the reward's is the next."""
    given = sorted(name for name in _NOT_ON_RAY if getattr(ns, name, None) is not None)
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(
            f"{flags}: not available with --engine ray (its gRPC proxy has no TLS and listens on "
            "--grpc-port; end TLS at an ingress in front of it)"
        )
    shadow = sorted(name for name in _SHADOW_FLAGS if getattr(ns, name, None) is not None)
    if shadow:
        flags = ", ".join("--" + n.replace("_", "-") for n in shadow)
        raise ValueError(f"{flags}: shadow mode runs in the embedded policy service only, not with --engine ray")
    ray_args = _flag_args(ns, RayDeploymentConfig)
    args = {
        "policy": _flag_args(ns, PolicyConfig) | ray_args,
        "reward": _flag_args(ns, RewardConfig) | ray_args,
    }
    for app in args.values():
        app["host"] = ns.proxy_host
    if ns.metrics_port is not None and ns.metrics_port > 0:
        args["reward"]["metrics_port"] = ns.metrics_port + 1
    return args


def cmd_serve(ns: argparse.Namespace) -> int:
    if ns.engine == "embedded":
        from loopserve.embedded import StackPorts, reward_config, run_embedded

        cfg = from_namespace(PolicyConfig, ns)
        reward = reward_config(cfg, from_namespace(RewardConfig, ns), StackPorts())
        logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_embedded(cfg, reward, train=False)

    names = [n.strip() for n in ns.apps.split(",") if n.strip()]
    args = ray_app_args(ns)
    level = ns.log_level or os.environ.get("LOOPSERVE_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        start_serve(
            grpc_port=ns.grpc_port,
            http_port=ns.http_port,
            host=ns.proxy_host,
            address=ns.address,
            num_cpus=ns.cluster_cpus,
        )
        # ray.init puts its own failure handler on SIGTERM (it prints a stack and the driver later
        # aborts mid-shutdown, leaving Ray's agents behind): take the signals back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        deploy(build_apps(names, args))
        print(
            f"Ray Serve: gRPC proxy on every interface, port {ns.grpc_port}; HTTP on {ns.proxy_host}:{ns.http_port}; "
            f"applications {', '.join(names)}"
        )
        if len(names) > 1:
            print(
                "clients add metadata `application: policy` (PolicyService, FeedbackService) "
                "or `application: reward` (RewardService)"
            )
        print("Ctrl-C stops Serve and the local Ray cluster", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        stop_serve(end_children=True)
    return 0
