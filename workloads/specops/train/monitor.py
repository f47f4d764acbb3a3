"""Where training metrics go: stdout lines under a progress bar, metrics.jsonl, and the experiment
trackers `train.reportTo` names (specops.train.tracking).

Only rank 0 reports. Every line also goes to the logger `specops.train.lines` (`LINES`), which does
not propagate (the lines are on stdout already): a caller keeping a log file adds its handler there
(`specops run` does, for logs/run.log). `metrics.jsonl` (one JSON object per logged step or
evaluation, appended across resumes) is the machine-readable record: tests and plots read the loss
curve from it. A resume first drops what the lost steps logged (records past the checkpoint's step)
and a line torn by a crash or a full disk, so the file holds each step once and every line parses.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specops.train.tracking import Trackers

METRICS_FILE = "metrics.jsonl"
LINES = logging.getLogger("specops.train.lines")
LINES.propagate = False
LogHook = Callable[[dict[str, Any]], None]
STDERR_TO_STDOUT = "SPECOPS_RANK0_STDERR_TO_STDOUT"
"""Set to 1 by `specops run --nproc N`, which reads rank 0's stdout into logs/run.log: rank 0 then
writes its stderr (log records, warnings, tracebacks) into its stdout too."""


def rank0_stderr_to_stdout() -> bool:
    """Under STDERR_TO_STDOUT, point rank 0's file descriptor 2 at its stdout, so every line it
    writes (C libraries' included) reaches the one stream its launcher reads, once and in order;
    the other ranks' stderr stays where it was. True when merged."""
    if os.environ.get(STDERR_TO_STDOUT) != "1" or os.environ.get("RANK", "0") != "0":
        return False
    sys.stderr.flush()
    os.dup2(sys.stdout.fileno(), 2)
    return True


class Monitor:
    """Progress bar + log lines + metrics.jsonl (+ trackers) on rank 0; silent elsewhere.

    `trackers` is a factory so that only rank 0 starts tracker runs."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        trackers: Callable[[], Trackers] | None = None,
        hook: LogHook | None = None,
    ) -> None:
        self.enabled = enabled
        self.hook = hook
        if enabled:
            _keep_records_up_to(output_dir / METRICS_FILE, start_step)
        self._file = (output_dir / METRICS_FILE).open("a") if enabled else None
        self._bar: Any = None
        self._trackers: Trackers | None = None
        if not enabled:
            return
        if trackers is not None:
            self._trackers = trackers()
        from tqdm import tqdm

        # disable=None: a bar on a terminal, plain lines in pod logs.
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=None, dynamic_ncols=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        LINES.info(line)
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line)
        else:
            print(line, file=sys.stdout, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Log one train or eval record everywhere it goes."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        assert self._file is not None
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        shown = " ".join(
            f"{k}={_fmt(v)}" for k, v in values.items() if k in _SHOWN or k.startswith("full_acc_")
        )
        self.write(f"[{kind} step {step}] {shown}")
        if self._trackers is not None:
            self._trackers.log(kind, step, values)
        if self.hook is not None:
            self.hook(record)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._trackers is not None:
            self._trackers.finish()
        if self._file is not None:
            self._file.close()


_SHOWN = ("epoch", "loss", "accept_proxy", "lr", "grad_norm", "tokens_per_s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite `path` without records logged after `step` (the resumed run logs them again) and
    without lines that do not parse (a write cut short); untouched when nothing must go."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    lines = raw.decode(errors="replace").splitlines()
    kept = [line for line in lines if (logged := _step_of(line)) is not None and logged <= step]
    if len(kept) == len(lines) and (not raw or raw.endswith(b"\n")):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _step_of(line: str) -> int | None:
    """The record's step, or None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None
