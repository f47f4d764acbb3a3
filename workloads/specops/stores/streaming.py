"""Shared pieces of the streaming stores: their error type and their metrics.

Metrics are counters and gauges one endpoint keeps, logged periodically and served to Prometheus.

Every endpoint (queue producer or consumer, broker, broker client) owns one `StreamStats`.
Counters only grow (`*_examples`, `*_bytes`, `idle_seconds`); gauges are levels (queue depth,
in-flight bytes). The log line shows rates over the last interval; Prometheus gets the totals
(rates are its `rate()`), plus `idle_fraction` = idle seconds over the endpoint's lifetime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)
PREFIX = "specops_stream_"


class StreamError(RuntimeError):
    """A stream peer vanished or broke the protocol; the message says which peer and what is at stake."""


class StreamStats:
    """Named counters and gauges of one stream endpoint (`role` labels them: producer, broker...).

    One thread writes, others read single floats: no lock is needed under the GIL.
    """

    def __init__(self, role: str, *, log_every_s: float = 30.0) -> None:
        self.role = role
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.started = time.monotonic()
        self._log_every_s = log_every_s
        self._last_log = self.started
        self._last_counters: dict[str, float] = {}

    def inc(self, name: str, value: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + value

    def count(self, side: str, nbytes: int) -> None:
        """One example of `nbytes` passed `side` (e.g. `in`, `out`, `sent`, `received`)."""
        self.inc(f"{side}_examples")
        self.inc(f"{side}_bytes", nbytes)

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = float(value)

    def idle_fraction(self) -> float:
        """Share of this endpoint's lifetime spent waiting for data (consumers) or room (producers)."""
        elapsed = time.monotonic() - self.started
        return self.counters.get("idle_seconds", 0.0) / elapsed if elapsed > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """Totals, gauges and lifetime rates, for reports and tests."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out = {**self.counters, **self.gauges}
        if "idle_seconds" in self.counters:
            out["idle_fraction"] = self.idle_fraction()
        for name, value in self.counters.items():
            if name.endswith(("_examples", "_bytes")):
                out[f"{name}_per_s"] = value / elapsed
        return out

    def maybe_log(self, force: bool = False) -> None:
        """Log rates since the previous line once `log_every_s` has passed."""
        now = time.monotonic()
        interval = now - self._last_log
        if not force and interval < self._log_every_s:
            return
        parts = []
        for name, value in sorted(self.counters.items()):
            delta = value - self._last_counters.get(name, 0.0)
            if name.endswith("_bytes"):
                parts.append(f"{name[:-6]}={delta / max(interval, 1e-9) / 1e6:.1f}MB/s")
            elif name.endswith("_examples"):
                parts.append(f"{name}={delta / max(interval, 1e-9):.1f}/s")
        parts += [f"{name}={value:g}" for name, value in sorted(self.gauges.items())]
        if "idle_seconds" in self.counters:
            parts.append(f"idle={self.idle_fraction():.2f}")
        log.info("%s: %s", self.role, " ".join(parts))
        self._last_log = now
        self._last_counters = dict(self.counters)


class StatsCollector:
    """Exposes StreamStats objects to a prometheus_client registry at scrape time."""

    def __init__(self, stats: list[StreamStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters: dict[str, Any] = {}
        gauges: dict[str, Any] = {}
        for stats in self._stats:
            for name, value in list(stats.counters.items()):
                family = counters.get(name) or CounterMetricFamily(
                    PREFIX + name, f"stream {name.replace('_', ' ')} (total)", labels=["role"]
                )
                counters[name] = family
                family.add_metric([stats.role], value)
            idle = [("idle_fraction", stats.idle_fraction())] if "idle_seconds" in stats.counters else []
            for name, value in [*stats.gauges.items(), *idle]:
                family = gauges.get(name) or GaugeMetricFamily(
                    PREFIX + name, f"stream {name.replace('_', ' ')}", labels=["role"]
                )
                gauges[name] = family
                family.add_metric([stats.role], value)
        yield from counters.values()
        yield from gauges.values()


class MetricsServer:
    """A Prometheus endpoint on `addr`:`port` (0 = any free port) serving one collector (an object
    with `collect()`); loopback unless asked, so the figures are not published to every network
    the host is on."""

    def __init__(self, port: int, collector: Any, addr: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    port: int | None, stats: list[StreamStats], host: str = "127.0.0.1"
) -> MetricsServer | None:
    """Start the endpoint when a port is configured; log where it listens."""
    if port is None:
        return None
    server = MetricsServer(port, StatsCollector(stats), host)
    log.info("stream metrics on %s:%d/metrics", host, server.port)
    return server
