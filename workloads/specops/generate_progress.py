"""Live progress of one generator process: the bar's total and ETA, periodic log lines, and
Prometheus metrics served while it generates (through specops.stores.streaming.MetricsServer).

The figures are the slice's `GenerateReport`, read where the driver keeps it up to date, so
nothing is counted twice. The total is the slice's conversations not yet stored, counted
before the engine loads (one more pass over the sources, no model work); an example that is
written, dropped or failed is one of them processed. With `sync.claimRanges` the total grows
with each claimed range. Local worker `w` serves `metrics.port + w`, as trainer ranks do.
The `regenerate` stage before it shows the same (`AnswerProgress`): its total is the
conversations no answers file holds yet, its rates are answers' and answer tokens'; the
generator's endpoint serves them too (`specops_generate_answers_*`), so an answering phase of
hours is not a capture stuck at 0.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from specops.generate_report import GenerateReport
from specops.stores.streaming import StatsCollector

log = logging.getLogger(__name__)

PREFIX = "specops_generate_"
COUNTERS = {
    "examples_written": ("written", "examples the engine produced and handed to the sink"),
    "examples_failed": ("failed", "examples the engine could not process even alone"),
    "examples_dropped": ("dropped", "conversations that yield no example (template, too few loss tokens)"),
    "examples_skipped": ("skipped", "examples already stored by an earlier run (resume)"),
    "tokens": ("tokens", "tokens of the written examples"),
    "regenerated": ("regenerated", "conversations the verifier answered (regenerate)"),
    "regenerated_tokens": ("regenerated_tokens", "answer tokens the verifier generated (regenerate)"),
}
"""Metric -> (GenerateReport field, help). Counters: Prometheus adds `_total`."""
GAUGES = {
    "examples_expected": "conversations of this slice to process in this run (the bar's total)",
    "examples_processed": "of those, written, dropped or failed so far",
    "examples_stored": "examples the sink holds durably (disk: committed shards; stream: acked)",
    "examples_per_second": "processed examples per second since the engine loaded",
    "tokens_per_second": "written tokens per second since the engine loaded",
    "eta_seconds": "estimated seconds until the slice is processed",
}
ANSWER_GAUGES = {
    "answers_expected": "conversations of this slice to answer in this run (regenerate; the answers bar's total)",
    "answers_done": "of those, answered (or found unanswerable) and stored in the answers file",
    "answers_eta_seconds": "estimated seconds until the slice is answered (capture comes after)",
}
"""Served only by a generator that answers its prompts first (`regenerate`)."""
METRIC_NAMES = sorted([*(PREFIX + name + "_total" for name in COUNTERS), *(PREFIX + name for name in GAUGES)])
"""Every sample name a generator serves (the answer gauges and a stream sink's metrics aside)."""
LOG_EVERY_S = 30.0
"""Seconds between progress lines in the log (and one line when the stage is done)."""


def slice_label(slice_index: int, num_slices: int) -> str:
    return f"slice {slice_index}/{num_slices}"


class StageProgress:
    """One stage's total, rates and ETA over the live report; its bar on stderr and its lines in
    the log (the bar may be on a terminal only)."""

    unit = "ex"

    def __init__(self, report: GenerateReport, label: str) -> None:
        self.report = report
        self.label = label
        self.expected = 0
        self._since: float | None = None
        self._last_log = time.monotonic()

    @property
    def processed(self) -> int:
        raise NotImplementedError

    @property
    def tokens(self) -> int:
        raise NotImplementedError

    def line(self) -> str:
        raise NotImplementedError

    def expect(self, count: int) -> None:
        """`count` more to process (the slice, or one more claimed range)."""
        self.expected += count

    def start(self) -> None:
        """The engine is loaded: rates count from here (loading is not generating)."""
        if self._since is None:
            self._since = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since

    def rates(self) -> tuple[float, float]:
        """(processed/s, tokens/s) since the engine loaded."""
        if self._since is None:
            return 0.0, 0.0
        elapsed = max(self.elapsed(), 1e-9)
        return self.processed / elapsed, self.tokens / elapsed

    def eta_seconds(self) -> float | None:
        per_s, _ = self.rates()
        remaining = max(0, self.expected - self.processed)
        if remaining == 0:
            return 0.0
        return remaining / per_s if per_s > 0 else None

    def eta(self) -> str:
        eta = self.eta_seconds()
        return "unknown" if eta is None else format_seconds(eta)

    def maybe_log(self, force: bool = False) -> None:
        """A progress line in the log every LOG_EVERY_S."""
        now = time.monotonic()
        if force or now - self._last_log >= LOG_EVERY_S:
            log.info("%s", self.line())
            self._last_log = now

    def bar(self, disable: bool = False) -> Any:
        """A tqdm bar on stderr with the total (None: a caller that counted nothing) and ETA."""
        from tqdm import tqdm

        return tqdm(
            disable=disable,
            desc=self.label,
            unit=self.unit,
            total=self.expected or None,
            initial=self.processed,
            file=sys.stderr,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )

    def show(self, bar: Any) -> None:
        """Bring `bar` up to date, and the log when a line is due."""
        bar.update(self.processed - bar.n)
        bar.set_postfix(tok_s=f"{self.rates()[1]:.0f}")
        self.maybe_log()


class GenerationProgress(StageProgress):
    """One generator's capture progress over its live report; a prometheus_client collector."""

    def __init__(self, report: GenerateReport, slice_index: int, num_slices: int, sink: Any = None) -> None:
        super().__init__(report, slice_label(slice_index, num_slices))
        self.slice = str(slice_index)
        self.sink = sink
        self.answers: AnswerProgress | None = None
        """The `regenerate` stage's progress, served beside the capture's while it exists."""

    @property
    def processed(self) -> int:
        return self.report.written + self.report.dropped + self.report.failed

    @property
    def tokens(self) -> int:
        return self.report.tokens

    def stored(self) -> int | None:
        """What the sink holds durably, when it can say (`committed_examples`)."""
        committed = getattr(self.sink, "committed_examples", None)
        return None if committed is None else int(committed)

    def line(self) -> str:
        examples_per_s, tokens_per_s = self.rates()
        failed = f", {self.report.failed} failed" if self.report.failed else ""
        dropped = f", {self.report.dropped} dropped" if self.report.dropped else ""
        return (
            f"{self.label}: {self.processed}/{self.expected} examples{failed}{dropped}, "
            f"{examples_per_s:.2f} examples/s, {tokens_per_s:.0f} tokens/s, ETA {self.eta()}"
        )

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, (field, help_text) in COUNTERS.items():
            counter = CounterMetricFamily(PREFIX + name, help_text, labels=["slice"])
            counter.add_metric([self.slice], float(getattr(self.report, field)))
            yield counter
        examples_per_s, tokens_per_s = self.rates()
        values: dict[str, float | None] = {
            "examples_expected": self.expected,
            "examples_processed": self.processed,
            "examples_stored": self.stored(),
            "examples_per_second": examples_per_s,
            "tokens_per_second": tokens_per_s,
            "eta_seconds": self.eta_seconds(),
        }
        helps = dict(GAUGES)
        if self.answers is not None:
            helps.update(ANSWER_GAUGES)
            values.update(
                answers_expected=self.answers.expected,
                answers_done=self.answers.processed,
                answers_eta_seconds=self.answers.eta_seconds(),
            )
        for name, help_text in helps.items():
            value = values[name]
            if value is not None:
                gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=["slice"])
                gauge.add_metric([self.slice], float(value))
                yield gauge
        stats = getattr(self.sink, "stats", None)
        if stats is not None:  # a stream sink's own figures: unacked bytes, time blocked on the broker
            yield from StatsCollector([stats]).collect()


class AnswerProgress(StageProgress):
    """The `regenerate` stage's progress: conversations handled (the total: those no answers file
    holds yet), how many got an answer, answer tokens; a done line closes it."""

    unit = "conv"

    def __init__(self, report: GenerateReport, slice_index: int, num_slices: int) -> None:
        super().__init__(report, slice_label(slice_index, num_slices) + " answers")
        self.done = 0
        """Conversations of the total stored in this slice's answers file."""

    @property
    def processed(self) -> int:
        return self.done

    @property
    def tokens(self) -> int:
        return self.report.regenerated_tokens

    def add(self, conversations: int, answered: int, tokens: int) -> None:
        """One window stored: `conversations` handled, `answered` of them got an answer."""
        self.done += conversations
        self.report.regenerated += answered
        self.report.regenerated_tokens += tokens

    def line(self) -> str:
        per_s, tokens_per_s = self.rates()
        return (
            f"{self.label}: {self.done}/{self.expected} conversations, {self.tokens} answer tokens, "
            f"{per_s:.2f} conversations/s, {tokens_per_s:.0f} tokens/s, ETA {self.eta()}"
        )

    def finish(self, reused: int) -> None:
        """The done line: what this run answered, and what it read back from earlier runs."""
        log.info(
            "%s: done, %d/%d conversations (%d answered, %d answer tokens, %.0f tokens/s) in %s; "
            "%d read back from earlier runs",
            self.label,
            self.done,
            self.expected,
            self.report.regenerated,
            self.tokens,
            self.rates()[1],
            format_seconds(self.elapsed()),
            reused,
        )


def format_seconds(seconds: float) -> str:
    """`5400` -> `1:30:00`, as the bar shows it."""
    from tqdm import tqdm

    return str(tqdm.format_interval(seconds))
