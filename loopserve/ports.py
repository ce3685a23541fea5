"""Free loopback ports for servers a process starts (the demo's services, the tests'), picked outside the
kernel's ephemeral range.

A port found by binding to 0 comes from the ephemeral range, which every outgoing connection and every
other bind(0) also draws from: between the caller releasing it and a server binding it, another process
(Ray starts dozens) may take it ("Failed to bind to address", seen in clean-clone runs of the tests, and
once in the generation demo's policy service). Ports between 20000 and the ephemeral range's start are
never handed out by the kernel, and lie above Ray's worker ports (10002-19999), so only a server told to
use one binds it. Ray Serve's replicas do bind there (direct ingress: HTTP from 30000 to 31000, gRPC from
40000 to 41000, one port each, allocated by Serve's controller as replicas start), so a port picked there
could be taken by a replica a moment later: those ranges are left out too."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOW = 20000
# Ray Serve's direct-ingress port ranges (ray.serve._private.constants, overridable as there)
_RAY_INGRESS = (
    ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", 30000, "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", 31000),
    ("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", 40000, "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", 41000),
)


def _ray_ingress_ports() -> list[range]:
    out = []
    for low_env, low, high_env, high in _RAY_INGRESS:
        try:
            out.append(range(int(os.environ.get(low_env, low)), int(os.environ.get(high_env, high)) + 1))
        except ValueError:  # Ray refuses a malformed value at its own start; use its default here
            out.append(range(low, high + 1))
    return out


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, tries: int = 10_000, stride: int = 0, count: int = 1) -> list[int]:
    """`n` distinct ports that bind on 127.0.0.1 now, from [20000, start of the ephemeral range) less Ray
    Serve's ingress ranges. With `count` > 1 each is a base whose `count` ports base + `stride` * k are
    all free (Ray replica k serves /metrics on base + 10 k: loopserve.serving.ray.ReplicaMetrics). Raises
    OSError after `tries` candidates without `n` that bind (a loopback with that range taken up)."""
    high = max(_ephemeral_start(), _LOW + 1000)
    reserved = _ray_ingress_ports()
    rng = random.SystemRandom()
    out: list[int] = []
    taken: set[int] = set()
    for _ in range(tries):
        if len(out) == n:
            break
        base = rng.randrange(_LOW, high)
        run = [base + stride * k for k in range(count)]
        if any(p in taken or p >= high or any(p in r for r in reserved) for p in run):
            continue
        if all(_binds(p) for p in run):
            out.append(base)
            taken.update(run)
    if len(out) < n:
        raise OSError(f"found {len(out)} of {n} free ports in [{_LOW}, {high}) after {tries} tries")
    return out


def free_port() -> int:
    """One port, as `free_ports`."""
    return free_ports(1)[0]
