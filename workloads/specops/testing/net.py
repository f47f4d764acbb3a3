"""Loopback ports for tests and benchmarks that start servers (brokers, API servers, operators)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago: the OS picks it, the probe socket is closed at once."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
