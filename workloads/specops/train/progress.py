"""Live progress of a training rank as Prometheus metrics, served while the run goes on
(through specops.stores.streaming.MetricsServer, as the broker's are).

Every rank serves its own endpoint (`metricsPort` + LOCAL_RANK, so ranks sharing a node do not
collide). The values are the world's, since metrics are all-reduced before they are logged: rank
0's endpoint is the run's progress. The operator reads it into `status.progress`; Prometheus
scrapes every rank through the chart's PodMonitor; the chart's Grafana dashboard draws it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

PREFIX = "specops_train_"
GAUGES = {
    "step": "optimizer steps done",
    "total_steps": "optimizer steps the run will make",
    "epoch": "current epoch (0-based)",
    "loss": "training loss of the last logged window (TTT steps weighted)",
    "accept_proxy": "expected accepted draft tokens per verifier step, from teacher-forced accuracy",
    "learning_rate": "learning rate",
    "grad_norm": "gradient norm before clipping",
    "tokens_per_second": "trained tokens per second, whole world",
    "eta_seconds": "estimated seconds until the last step",
    "validation_loss": "loss on the held-out examples at the last evaluation",
    "validation_accept_proxy": "accept proxy on the held-out examples at the last evaluation",
    "best_validation_loss": "lowest validation loss so far",
}
PER_TTT_STEP = {
    "ttt_loss": ("loss_", "loss of each TTT step"),
    "ttt_accuracy": ("full_acc_", "teacher-forced accuracy of each TTT step"),
    "ttt_conditional_accuracy": ("cond_acc_", "accuracy of each TTT step given the earlier ones were right"),
}
TRAIN_KEYS = {
    "loss": "loss",
    "accept_proxy": "accept_proxy",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "tokens_per_second": "tokens_per_s",
}
EVAL_KEYS = {"validation_loss": "loss", "validation_accept_proxy": "accept_proxy"}
METRIC_NAMES = sorted(PREFIX + name for name in [*GAUGES, *PER_TTT_STEP])
"""Every metric name a trainer serves (the dashboard test checks the chart's against these)."""


class Progress:
    """The latest figures of one rank; a prometheus_client collector over them."""

    def __init__(self, rank: int, total_steps: int, start_step: int) -> None:
        self.rank = str(rank)
        self.values: dict[str, float] = {"step": start_step, "total_steps": total_steps}
        self.per_step: dict[str, dict[str, float]] = {name: {} for name in PER_TTT_STEP}
        self._since: tuple[float, int] = (time.monotonic(), start_step)
        self._step_seconds: float | None = None

    def advance(self, step: int, epoch: int) -> None:
        self.values.update(step=step, epoch=epoch)

    def record(self, kind: str, values: Mapping[str, Any]) -> None:
        """Take a logged train or eval record (the same one metrics.jsonl gets)."""
        if kind == "eval":
            self.values.update({name: float(values[key]) for name, key in EVAL_KEYS.items() if key in values})
            best = self.values.get("best_validation_loss")
            if "loss" in values and (best is None or values["loss"] < best):
                self.values["best_validation_loss"] = float(values["loss"])
            return
        self.values.update({name: float(values[key]) for name, key in TRAIN_KEYS.items() if key in values})
        for name, (key_prefix, _) in PER_TTT_STEP.items():
            self.per_step[name] = {
                key.removeprefix(key_prefix): float(value)
                for key, value in values.items()
                if key.startswith(key_prefix) and key.removeprefix(key_prefix).isdigit()
            }
        self._estimate_eta()

    def _estimate_eta(self) -> None:
        now, step = time.monotonic(), int(self.values["step"])
        then, before = self._since
        if step > before:
            latest = (now - then) / (step - before)
            # A moving average: one slow window (an evaluation, a checkpoint) does not swing it.
            self._step_seconds = (
                latest if self._step_seconds is None else 0.7 * self._step_seconds + 0.3 * latest
            )
            self._since = (now, step)
        if self._step_seconds is not None:
            self.values["eta_seconds"] = max(0.0, (self.values["total_steps"] - step) * self._step_seconds)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, help_text in GAUGES.items():
            if name in self.values:
                family = GaugeMetricFamily(PREFIX + name, help_text, labels=["rank"])
                family.add_metric([self.rank], self.values[name])
                yield family
        for name, (_, help_text) in PER_TTT_STEP.items():
            if self.per_step[name]:
                family = GaugeMetricFamily(PREFIX + name, help_text, labels=["rank", "ttt_step"])
                for ttt_step, value in sorted(self.per_step[name].items()):
                    family.add_metric([self.rank, ttt_step], value)
                yield family
