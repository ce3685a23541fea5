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
    """With the range narrowed to 1,000 ports of which one is held, that one never comes back."""
    monkeypatch.setattr(ports, "_ephemeral_start", lambda: 0)  # the range becomes [20000, 21000)
    taken = ports.free_ports(1)[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", taken))
        for _ in range(20):
            assert taken not in ports.free_ports(50)


def test_the_search_is_bounded() -> None:
    assert ports.free_ports(0) == []
    with pytest.raises(OSError, match="0 of 1 free ports"):
        ports.free_ports(1, tries=0)
