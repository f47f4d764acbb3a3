"""`python -m specops_operator.report -- COMMAND ...`: run a workload command and keep its report.

Workload pods hold no API credentials. Their results reach the operator through Kubernetes
itself: when a container ends, the kubelet copies its termination-message file into the pod
status, where the operator (which may read pods) finds it. The `specops` commands print one JSON
report line on stdout; this wrapper runs the command as a child, passes stdout/stderr through
unchanged, forwards SIGTERM/SIGINT (so a preempted trainer still checkpoints), writes the last
JSON object line into the termination file (trimmed to the kubelet's 4 KiB) and exits with the
child's code — or, when the child failed, with the first code a `specops` command recorded in
`$SPECOPS_EXIT_FILE` (torchrun turns a worker's exit 2 into its own exit 1; the Job's
`podFailurePolicy` needs the 2). Standard library and `specops.exitcodes` only: it runs in the
workload image.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from types import FrameType
from typing import IO, Any

from specops import exitcodes

MAX_BYTES = 4096
"""The kubelet keeps at most this much of a termination message."""
DEFAULT_PATH = "/dev/termination-log"


def parse_report(line: bytes | str) -> dict[str, Any] | None:
    """A JSON object line, or None."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def fit(report: dict[str, Any], limit: int = MAX_BYTES) -> str:
    """The report as JSON within `limit` bytes: long lists go first, then everything but numbers."""
    text = json.dumps(report, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text
    slim = {k: v for k, v in report.items() if not isinstance(v, list | dict)} | {"truncated": True}
    text = json.dumps(slim, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text
    numbers = {k: v for k, v in slim.items() if isinstance(v, int | float | bool)}
    return json.dumps(numbers, separators=(",", ":"))[:limit]


def run(command: Sequence[str], termination_path: str, out: Any = None) -> int:
    """Run `command`, echo its stdout to `out`, save its last report; returns the exit code."""
    fd, exit_file = tempfile.mkstemp(prefix="specops-exit-")
    os.close(fd)
    try:
        code = _supervise(command, termination_path, out, {**os.environ, exitcodes.EXIT_FILE_ENV: exit_file})
        recorded = exitcodes.first_recorded(exit_file) if code else None
    finally:
        os.unlink(exit_file)
    return code if recorded is None else recorded


ERROR_LINE = re.compile(r"^specops[\w .-]*: error: ")
"""The one line every `specops` command prints on stderr for an error it understood."""


def _supervise(command: Sequence[str], termination_path: str, out: Any, env: dict[str, str]) -> int:
    out = out if out is not None else sys.stdout.buffer
    try:
        child = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as exc:
        print(f"specops_operator.report: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    errors: list[str] = []
    echo = threading.Thread(target=_echo_stderr, args=(child.stderr, errors), daemon=True)
    echo.start()
    report = None
    assert child.stdout is not None
    for line in child.stdout:
        out.write(line)
        out.flush()
        report = parse_report(line) or report
    code = child.wait()
    echo.join(timeout=10)
    if code != 0 and errors:
        # The error line, not the log tail: under torchrun a worker's error is followed by the
        # launcher's traceback, which would push it out of the kubelet's 2 KiB log fallback.
        report = {**(report or {}), "error": errors[-1]}
    if report is not None:
        try:
            with open(termination_path, "w") as handle:
                handle.write(fit(report))
        except OSError as exc:
            print(
                f"specops_operator.report: cannot write {termination_path}: {exc.strerror}", file=sys.stderr
            )
    return code if code >= 0 else 128 - code


def _echo_stderr(stream: IO[bytes] | None, errors: list[str]) -> None:
    """Pass the child's stderr through unchanged, keeping its `specops ...: error:` lines."""
    assert stream is not None
    for line in stream:
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
        text = line.decode("utf-8", "replace").strip()
        if ERROR_LINE.match(text):
            errors.append(text[: MAX_BYTES // 2])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m specops_operator.report -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    return run(args, os.environ.get("SPECOPS_TERMINATION_LOG", DEFAULT_PATH))


if __name__ == "__main__":
    sys.exit(main())
