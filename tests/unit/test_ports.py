"""loopserve.ports.free_ports: the ports the demo and the tests bind their servers to."""

from __future__ import annotations

import socket

import pytest

from loopserve import ports


def test_free_ports_are_distinct_outside_the_ephemeral_range_and_bind() -> None:
    got = ports.free_ports(8)
    assert len(got) == len(set(got)) == 8
    assert all(20000 <= p < max(ports._ephemeral_start(), 21000) for p in got)
    held = []
    try:
        for p in got:  # all of them at once: none is handed out twice
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", p))
    finally:
        for s in held:
            s.close()


def test_a_port_in_use_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The held port is the first candidate offered: it is skipped, and the next ones are returned."""
    taken = ports.free_ports(1)[0]
    offered = iter([taken, taken + 1, taken + 2, taken + 3])

    class Draws:
        def randrange(self, low: int, high: int) -> int:
            return next(offered)

    monkeypatch.setattr(ports.random, "SystemRandom", Draws)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", taken))
        got = ports.free_ports(2)
    assert taken not in got and len(got) == 2


def test_the_search_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every bind refused, it gives up after exactly `tries` candidates."""
    binds = []

    def refuse(self: socket.socket, address: object) -> None:
        binds.append(address)
        raise OSError("address in use")

    assert ports.free_ports(0) == []
    offer(monkeypatch, list(range(20000, 20050)))  # (a candidate in Ray's range is skipped without a bind)
    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(OSError, match="0 of 1 free ports"):
        ports.free_ports(1, tries=50)
    assert len(binds) == 50


def offer(monkeypatch: pytest.MonkeyPatch, candidates: list[int]) -> None:
    """free_ports draws these candidates, in this order."""
    offered = iter(candidates)

    class Draws:
        def randrange(self, low: int, high: int) -> int:
            return next(offered)

    monkeypatch.setattr(ports.random, "SystemRandom", Draws)


def test_ray_serves_ingress_ports_are_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve's replicas bind 30000-31000 (direct ingress) as they start: free now is not free then."""
    good, other = ports.free_ports(2)
    offer(monkeypatch, [30000, 30500, 31000, good])
    assert ports.free_ports(1) == [good]
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(good))  # Ray's own override moves the range
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(good))
    offer(monkeypatch, [good, other])
    assert ports.free_ports(1) == [other]


def test_a_base_is_handed_out_only_with_every_port_of_its_run_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray replica k serves /metrics on base + 10 k: a base whose second port is taken is skipped."""
    first, second = ports.free_ports(2, stride=10, count=2)
    offer(monkeypatch, [first, second])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", first + 10))
        assert ports.free_ports(1, stride=10, count=2) == [second]
