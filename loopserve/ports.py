"""Free loopback ports for servers a process starts (the demo's services, the tests'), picked outside the
kernel's ephemeral range.

A port found by binding to 0 comes from the ephemeral range, which every outgoing connection and every
other bind(0) also draws from: between the caller releasing it and a server binding it, another process
(Ray starts dozens) may take it ("Failed to bind to address", seen in clean-clone runs of the tests, and
once in the generation demo's policy service). Ports between 20000 and the ephemeral range's start are
never handed out by the kernel, and lie above Ray's worker ports (10002-19999), so only a server told to
use one binds it."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOW = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, *, tries: int = 10_000) -> list[int]:
    """`n` distinct ports that bind on 127.0.0.1 now, from [20000, start of the ephemeral range). Raises
    OSError after `tries` candidates without `n` that bind (a loopback with that range taken up)."""
    high = max(_ephemeral_start(), _LOW + 1000)
    rng = random.SystemRandom()
    out: list[int] = []
    for _ in range(tries):
        if len(out) == n:
            break
        port = rng.randrange(_LOW, high)
        if port in out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
    if len(out) < n:
        raise OSError(f"found {len(out)} of {n} free ports in [{_LOW}, {high}) after {tries} tries")
    return out


def free_port() -> int:
    """One port, as `free_ports`."""
    return free_ports(1)[0]
