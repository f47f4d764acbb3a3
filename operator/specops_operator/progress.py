"""Live progress for status: the workload pods' Prometheus metrics, read while they run.

Every trainer pod serves its rank's progress on its container port `metrics` (the workload's
`specops.train.progress`), every generator pod its slice's (`specops.generate_progress`). On each
refresh the operator reads rank 0's (the trainer pod of completion index 0) and every running
generator's over the pod network: no extra RBAC for the pods, no sidecar. A pod that does not
answer (not listening yet, a network policy) leaves the last recorded figures in place.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from specops.generate_progress import PREFIX as GENERATE_PREFIX
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
GENERATION_FIELDS = {
    GENERATE_PREFIX + "examples_processed": "runningDone",
    GENERATE_PREFIX + "examples_expected": "runningTotal",
}
"""Generator metric -> `status.progress` field, summed over the running generators."""
ANSWER_FIELDS = {
    GENERATE_PREFIX + "answers_done": "runningAnswered",
    GENERATE_PREFIX + "answers_expected": "runningAnswerTotal",
}
"""The same for the answering stage (`regenerate`): only generators that answer serve them, and
status has them only when one did."""
READ_TIMEOUT_S = 2.0
PARALLEL_READS = 16
"""Generator endpoints read at once: a refresh waits about READ_TIMEOUT_S for all of them."""


def metrics_endpoints(pods: Sequence[Mapping[str, Any]], index: str | None = None) -> list[str]:
    """`http://<pod IP>:<port metrics>/metrics` of each running pod (of completion `index` only, if given)."""
    found = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if index is not None and (meta.get("annotations") or {}).get(INDEX_ANNOTATION) != index:
            continue
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in (pod.get("spec") or {}).get("containers") or []:
            if container.get("name") != CONTAINER:
                continue
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    found.append(f"http://{status['podIP']}:{port['containerPort']}/metrics")
    return found


def rank0_endpoint(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The metrics endpoint of the running trainer pod of completion index 0."""
    return next(iter(metrics_endpoints(pods, "0")), None)


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


def parse_generation(text: str) -> dict[str, float]:
    """One generator's `status.progress` figures (its slice's examples processed and expected, its
    conversations answered and to answer when it regenerates, and its ETA) in a scrape of its endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = GENERATION_FIELDS.get(sample.name) or ANSWER_FIELDS.get(sample.name)
            if field is not None:
                found[field] = found.get(field, 0.0) + float(sample.value)
            elif sample.name == GENERATE_PREFIX + "eta_seconds":
                found["etaSeconds"] = max(found.get("etaSeconds", 0.0), float(sample.value))
    return found


def _scrape(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())
    except OSError as exc:
        log.debug("progress: %s did not answer: %s", url, exc)
        return None


def read_progress(url: str, timeout: float = READ_TIMEOUT_S) -> dict[str, float]:
    """Rank 0's figures now; empty when it does not answer (logged, never raised)."""
    text = _scrape(url, timeout)
    try:
        return parse_progress(text) if text is not None else {}
    except ValueError as exc:
        log.debug("progress: %s sent no metrics: %s", url, exc)
        return {}


def read_generation(urls: Sequence[str], timeout: float = READ_TIMEOUT_S) -> dict[str, float]:
    """The running generators' figures now: examples processed and expected summed, the slowest
    one's ETA; empty when none answers. An ETA is present only when every generator that
    answered has one (a generator still loading its model has none)."""
    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(urls))) as pool:
        texts = [t for t in pool.map(lambda url: _scrape(url, timeout), urls) if t is not None]
    total: dict[str, float] = {}
    etas = []
    for text in texts:
        try:
            figures = parse_generation(text)
        except ValueError:
            continue
        for field in GENERATION_FIELDS.values():
            total[field] = total.get(field, 0.0) + figures.get(field, 0.0)
        for field in ANSWER_FIELDS.values():
            if field in figures:
                total[field] = total.get(field, 0.0) + figures[field]
        etas.append(figures.get("etaSeconds"))
    if etas and all(eta is not None for eta in etas):
        total["etaSeconds"] = max(eta for eta in etas if eta is not None)
    return total


def eta_text(seconds: float) -> str:
    """`5400` -> `1h30m`: what the ETA column shows."""
    minutes = int(seconds + 59) // 60
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
