"""Live training progress for status: rank 0's Prometheus metrics, read while the trainer runs.

Every trainer pod serves its rank's progress on its container port `metrics` (the workload's
`specops.train.progress`). The operator reads rank 0's (the pod of completion index 0) over the pod
network on each refresh: no extra RBAC for the pods, no sidecar. A pod that does not answer (not
listening yet, a network policy) leaves the last recorded figures in place.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from specops.train.progress import PREFIX
from specops_operator.builders.common import CONTAINER, INDEX_ANNOTATION

log = logging.getLogger(__name__)

LIVE_FIELDS = {
    PREFIX + "step": "step",
    PREFIX + "total_steps": "totalSteps",
    PREFIX + "loss": "loss",
    PREFIX + "tokens_per_second": "tokensPerSecond",
    PREFIX + "eta_seconds": "etaSeconds",
}
"""Metric (as the trainer names it) -> `status.progress` field."""
READ_TIMEOUT_S = 2.0


def rank0_endpoint(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """`http://<pod IP>:<port metrics>/metrics` of the running pod of completion index 0."""
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        index = (meta.get("annotations") or {}).get(INDEX_ANNOTATION)
        if index != "0" or status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in (pod.get("spec") or {}).get("containers") or []:
            if container.get("name") != CONTAINER:
                continue
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    return f"http://{status['podIP']}:{port['containerPort']}/metrics"
    return None


def parse_progress(text: str) -> dict[str, float]:
    """The `status.progress` fields in a scrape of rank 0 (labels `rank="0"`)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = LIVE_FIELDS.get(sample.name)
            if field is not None and sample.labels.get("rank") == "0":
                found[field] = float(sample.value)
    return found


def read_progress(url: str, timeout: float = READ_TIMEOUT_S) -> dict[str, float]:
    """Rank 0's figures now; empty when it does not answer (logged, never raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_progress(response.read().decode())
    except (OSError, ValueError) as exc:
        log.debug("progress: %s did not answer: %s", url, exc)
        return {}


def eta_text(seconds: float) -> str:
    """`5400` -> `1h30m`: what the ETA column shows."""
    minutes = int(seconds + 59) // 60
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
