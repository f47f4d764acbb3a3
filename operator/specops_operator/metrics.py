"""Prometheus metrics of the operator itself: reconciles, errors, latency, resources by phase.

kopf's liveness endpoint answers `/healthz` only; these are served on a port of their own
(`--metrics-port`, the chart's ServiceMonitor scrapes it). Each `OperatorMetrics` has its own
registry, so several operators in one process (tests) do not share counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

NO_PHASE = "Unknown"
"""Phase of a resource whose status has no Ready condition yet."""


def phase_of(status: dict[str, Any]) -> str:
    """The Ready condition's reason: the phase the REASON column shows (`Generating`, `Complete`, ...)."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("reason") or NO_PHASE)
    return NO_PHASE


class _Phases(Collector):
    """`specops_resources{kind,phase}`: how many resources are in each phase now."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str, str], str] = {}

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "specops_resources",
            "SpecOps resources by kind and phase (Ready reason)",
            labels=["kind", "phase"],
        )
        counts: dict[tuple[str, str], int] = {}
        for (kind, _, _), phase in self.phases.items():
            counts[kind, phase] = counts.get((kind, phase), 0) + 1
        for (kind, phase), count in sorted(counts.items()):
            family.add_metric([kind, phase], count)
        yield family


class OperatorMetrics:
    """What the handlers report; `serve` exposes it as `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter("specops_reconciles", "Reconciles run", ["kind"], registry=self.registry)
        self.errors = Counter(
            "specops_reconcile_errors",
            "Reconciles that raised (API errors; kopf retries them)",
            ["kind", "error"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "specops_reconcile_duration_seconds",
            "Time one reconcile took",
            ["kind"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self._phases = _Phases()
        self.registry.register(self._phases)

    @contextmanager
    def reconciling(self, kind: str) -> Iterator[None]:
        """Count and time one reconcile; an exception is counted as an error and passed on."""
        start = time.perf_counter()
        self.reconciles.labels(kind).inc()
        try:
            yield
        except Exception as exc:
            self.errors.labels(kind, type(exc).__name__).inc()
            raise
        finally:
            self.latency.labels(kind).observe(time.perf_counter() - start)

    def record(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """The phase a resource is in after a reconcile."""
        self._phases.phases[_key(body)] = phase_of(status)

    def forget(self, body: dict[str, Any]) -> None:
        """A deleted resource leaves the phase counts."""
        self._phases.phases.pop(_key(body), None)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """`/metrics` on `addr:port`, from a daemon thread."""
        start_http_server(port, addr, registry=self.registry)


def _key(body: dict[str, Any]) -> tuple[str, str, str]:
    meta = body.get("metadata") or {}
    return str(body.get("kind")), str(meta.get("namespace")), str(meta.get("name"))
