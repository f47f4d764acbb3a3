"""The operator's /metrics: what the chart's ServiceMonitor scrapes, read over HTTP as Prometheus would."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Api, Runner, example
from specops_operator.metrics import OperatorMetrics

OFFLINE = "qwen3-8b-sharegpt"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_reconciles_latency_errors_and_phases(api: Api, operator: Runner) -> None:
    running = await operator()
    port = _free_port()
    running.ctx.metrics.serve(port, "127.0.0.1")
    await api.create(example("datagen-offline.yaml"))
    bad = example("datagen-offline.yaml")
    bad["metadata"]["name"] = "too-small"
    bad["spec"]["storage"]["size"] = "1Gi"
    await api.create(bad)
    kind = (("kind", "SpeculatorDataGen"),)

    def scraped() -> bool:
        samples = _scrape(port)
        return samples.get(("specops_resources", (*kind, ("phase", "StorageTooSmall")))) == 1.0 and any(
            name == "specops_resources" and dict(labels)["phase"] not in ("StorageTooSmall", "Unknown")
            for name, labels in samples
        )

    await api.until(scraped, what="both resources in the phase metric")
    samples = await asyncio.to_thread(_scrape, port)
    assert samples[("specops_reconciles_total", kind)] >= 2
    assert samples[("specops_reconcile_duration_seconds_count", kind)] >= 2
    assert samples[("specops_reconcile_duration_seconds_sum", kind)] > 0
    assert not any(name == "specops_reconcile_errors_total" for name, _ in samples)  # none raised


def test_a_raising_reconcile_counts_as_an_error_and_is_passed_on() -> None:
    metrics = OperatorMetrics()
    with pytest.raises(ConnectionError), metrics.reconciling("SpeculatorTraining"):
        raise ConnectionError("API server gone")
    errors = {"kind": "SpeculatorTraining", "error": "ConnectionError"}
    assert metrics.registry.get_sample_value("specops_reconcile_errors_total", errors) == 1
    assert metrics.registry.get_sample_value("specops_reconciles_total", {"kind": "SpeculatorTraining"}) == 1
