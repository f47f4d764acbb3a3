"""The exit-code contract of every `specops` command, and how it survives torchrun.

A Job's `podFailurePolicy` can only act on a container's exit code, so the code must say whether
a retry can help. Standard library only: the operator's pod wrapper (`specops_operator.report`)
and its Job builders read the same numbers.

| code | meaning | retried by the Job |
|---|---|---|
| 0 | success | - |
| 1 | failure a rerun may fix (crash, lost stream, failed workers, disk full); reruns resume | yes |
| 2 | configuration or usage error (also argparse's code) | no |
| 3 | input data unusable (corrupt or mismatched shards, checkpoint state, no prompts) | no |
| 4 | evaluation verdict: not lossless, or not better than the untrained draft | no |
| 130 / 143 | stopped by SIGINT / SIGTERM (after a checkpoint); reruns resume | yes |

torchrun reports any failed worker as exit 1. Under `SPECOPS_EXIT_FILE` (set by the pod wrapper)
each command therefore appends its nonzero code to that file, and the wrapper exits with the first
code recorded (the root cause; ranks stopped by torchrun afterwards record 143 later).
"""

from __future__ import annotations

import errno
import os
import sys

OK = 0
FAILED = 1
CONFIG = 2
DATA = 3
NOT_BETTER = 4
INTERRUPTED = 130
TERMINATED = 143
FATAL = (CONFIG, DATA, NOT_BETTER)
"""Codes no retry can change: Jobs fail at once on them (`podFailurePolicy` FailJob)."""

EXIT_FILE_ENV = "SPECOPS_EXIT_FILE"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Diverged(RuntimeError):
    """Training produced an inf or NaN: exit 2, since a rerun resumes into the same divergence and
    only a change of the spec (learning rate, clipping, precision) helps."""


class DiskFull(OSError):
    """A write found no space left (ENOSPC, EDQUOT): exit 1, since a rerun resumes once space is
    freed. The writer left no torn state behind; the message names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DataError(ValueError):
    """Input data cannot be used as it is (corrupt, mismatched or empty): exit 3, never retried."""


def out_of_space(exc: BaseException) -> bool:
    """A write found the disk (or the quota) full: any writer, not only those that raise DiskFull."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def classify(exc: BaseException) -> int | None:
    """The contract's code for an expected error; None for a bug (a traceback, exit 1)."""
    from specops.config import ConfigError
    from specops.paths import PathNotAllowedError
    from specops.stores.streaming import StreamError

    if isinstance(exc, DataError):
        return DATA
    if isinstance(exc, ConfigError | PathNotAllowedError | FileNotFoundError | Diverged):
        return CONFIG
    if isinstance(exc, StreamError | ConnectionError) or out_of_space(exc):
        return FAILED
    return None


def fail(command: str, exc: BaseException, default: int = FAILED) -> int:
    """Print the one-line error of `specops COMMAND` and return its code (`default` if unclassified)."""
    print(f"specops {command}: error: {exc}", file=sys.stderr)
    code = classify(exc)
    return default if code is None else code


def record(code: int) -> None:
    """Append a nonzero exit code to `$SPECOPS_EXIT_FILE`, when the pod wrapper set one."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not code or not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{code}\n".encode())
    finally:
        os.close(fd)


def first_recorded(path: str) -> int | None:
    """The first code appended to `path` (the root cause), or None."""
    try:
        with open(path) as handle:
            first = handle.readline().strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None
