"""Ports for test and benchmark servers come from below the kernel's ephemeral range."""

from __future__ import annotations

import socket

from reki_core import localstack


def test_a_port_block_is_free_and_below_the_ephemeral_range():
    floor = localstack.ephemeral_port_floor()
    for _ in range(50):
        base = localstack.free_port_block(12)
        assert 20000 <= base and base + 12 <= floor
    with socket.socket() as s:  # and it is really free
        s.bind(("127.0.0.1", base))


def test_a_wide_ephemeral_range_falls_back_to_the_old_span(monkeypatch):
    monkeypatch.setattr(localstack, "ephemeral_port_floor", lambda: 1024)
    bases = {localstack.free_port_block(4) for _ in range(20)}
    assert all(20000 <= b < 40000 for b in bases)
