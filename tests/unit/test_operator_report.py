"""The pod wrapper that turns a workload's JSON report line into the container's termination message."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from specops_operator.report import MAX_BYTES, fit, main, parse_report, run

CHILD = [sys.executable, "-c"]


def test_last_json_line_is_kept_and_output_passes_through(tmp_path: Path) -> None:
    out = io.BytesIO()
    script = "print('progress 1'); print('{\"written\": 1}'); print('{\"written\": 5, \"ok\": true}'); print('bye')"
    code = run([*CHILD, script], str(tmp_path / "term"), out)
    assert code == 0
    assert out.getvalue().decode().splitlines() == [
        "progress 1",
        '{"written": 1}',
        '{"written": 5, "ok": true}',
        "bye",
    ]
    assert json.loads((tmp_path / "term").read_text()) == {"written": 5, "ok": True}


def test_exit_code_is_the_childs_and_no_report_writes_nothing(tmp_path: Path) -> None:
    assert (
        run([*CHILD, "import sys; print('no report'); sys.exit(2)"], str(tmp_path / "term"), io.BytesIO())
        == 2
    )
    assert not (tmp_path / "term").exists()
    assert run(["/nonexistent/specops"], str(tmp_path / "term"), io.BytesIO()) == 127


def test_unwritable_termination_file_does_not_change_the_exit_code(tmp_path: Path) -> None:
    assert run([*CHILD, "print('{}')"], str(tmp_path / "missing" / "term"), io.BytesIO()) == 0


def test_fit_trims_to_the_kubelet_limit() -> None:
    small = {"written": 3, "failed_ids": ["a", "b"]}
    assert json.loads(fit(small)) == small
    big = {"written": 3, "tokens": 10, "failed_ids": [f"dataset/{i}/0" for i in range(2000)], "note": "x"}
    trimmed = json.loads(fit(big))
    assert trimmed == {"written": 3, "tokens": 10, "note": "x", "truncated": True}
    huge = {"written": 3, "note": "y" * 10_000}
    assert json.loads(fit(huge)) == {"written": 3, "truncated": True}
    assert len(fit(huge).encode()) <= MAX_BYTES


def test_parse_report() -> None:
    assert parse_report(b'{"a": 1}\n') == {"a": 1}
    assert parse_report("[1, 2]") is None and parse_report("{broken") is None and parse_report("text") is None


def test_sigterm_reaches_the_child_and_its_report_is_kept(tmp_path: Path) -> None:
    child = (
        "import json, signal, sys, time\n"
        "def stop(*_):\n"
        "    print(json.dumps({'step': 7, 'interrupted': True}), flush=True); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    term = tmp_path / "term"
    env = {**os.environ, "SPECOPS_TERMINATION_LOG": str(term)}
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "specops_operator.report", "--", *CHILD, child],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert wrapper.stdout is not None
    assert wrapper.stdout.readline().strip() == b"ready"
    time.sleep(0.1)
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(10) == 143
    assert json.loads(term.read_text()) == {"step": 7, "interrupted": True}


def test_usage_without_a_command() -> None:
    assert main([]) == 2 and main(["--"]) == 2
