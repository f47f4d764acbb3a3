"""The pod wrapper that turns a workload's JSON report line into the container's termination message."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _operator_support import ROOT

from specops import exitcodes
from specops_operator.api import SpeculatorDataGen, load_resources
from specops_operator.builders.common import Defaults
from specops_operator.builders.datagen import DataGenNames
from specops_operator.builders.training import DataSource, build_training
from specops_operator.report import MAX_BYTES, fit, main, parse_report, run
from specops_operator.status import failure_detail

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


def test_a_failed_childs_recorded_code_wins_over_its_exit_status(tmp_path: Path) -> None:
    """What torchrun does to a worker's code: the wrapper restores the first one recorded."""
    relay = (
        "import os, subprocess, sys\n"
        "for code in (3, 143):\n"
        "    subprocess.run([sys.executable, '-c', f'from specops import exitcodes; exitcodes.record({code})'])\n"
        "sys.exit(1)\n"
    )
    assert run([*CHILD, relay], str(tmp_path / "term"), io.BytesIO()) == exitcodes.DATA
    success = "from specops import exitcodes; exitcodes.record(2)"  # exit 0 stays 0
    assert run([*CHILD, success], str(tmp_path / "term"), io.BytesIO()) == 0


def test_a_config_error_under_torchrun_exits_2_at_the_pod_level(tmp_path: Path) -> None:
    """The trainer pod's own command (report wrapper + torchrun + specops train) and its rendezvous
    settings (c10d, one node here, on a local port) with a bad config: torchrun alone exits 1,
    which the Job's podFailurePolicy would retry on 8-GPU pods."""
    training = load_resources((ROOT / "examples" / "hass-train.yaml").read_text())[0]
    training.metadata.namespace, training.metadata.uid = "ml", "uid"
    source = _offline_source()
    job = next(m for m in build_training(training, Defaults(), source, trained=False) if m["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    config = tmp_path / "config.yaml"
    config.write_text("draft: {speculative_tokens: 0}\n")
    command = [str(config) if arg == "/etc/specops/config.yaml" else arg for arg in container["command"]]
    assert command[:5] == ["python", "-m", "specops_operator.report", "--", "torchrun"]
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SPECOPS_TERMINATION_LOG": str(tmp_path / "term"),
        **{e["name"]: e["value"] for e in container["env"] if e["name"].startswith("PET_")},
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "1",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}",
        "PET_LOCAL_ADDR": "127.0.0.1",  # the pod's Service DNS name there
    }
    assert env["PET_RDZV_BACKEND"] == "c10d"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == exitcodes.CONFIG, done.stderr[-3000:]
    assert "specops train: error:" in done.stderr
    assert "exitcode  : 2" in done.stderr  # torchrun saw the 2 and reported its own 1
    # The pod's termination message is the command's own error line, not torchrun's traceback
    # (which follows it and would fill the kubelet's 2 KiB log fallback), and status reads it.
    kept = json.loads((tmp_path / "term").read_text())
    assert kept["error"].startswith("specops train: error: ") and "verifier: Field required" in kept["error"]
    pod = {
        "status": {
            "containerStatuses": [
                {"name": "workload", "state": {"terminated": {"exitCode": 2, "message": fit(kept)}}}
            ]
        }
    }
    assert failure_detail([pod]) == kept["error"]


def _offline_source() -> DataSource:
    datagen = load_resources((ROOT / "examples" / "datagen-offline.yaml").read_text())[0]
    assert isinstance(datagen, SpeculatorDataGen)
    ready = {"conditions": [{"type": "ShardsComplete", "status": "True"}]}
    return DataSource(DataGenNames(datagen.metadata.name, "ml"), datagen.spec, ready)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_cli_records_each_nonzero_code_for_the_wrapper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from specops.cli import main as specops_main

    exit_file = tmp_path / "exit"
    monkeypatch.setenv(exitcodes.EXIT_FILE_ENV, str(exit_file))
    assert specops_main(["train", "--config", str(tmp_path / "missing.yaml")]) == exitcodes.CONFIG
    assert specops_main(["train"]) == exitcodes.CONFIG  # argparse's usage error, recorded too
    assert specops_main(["crds", "--out", str(tmp_path / "crds")]) == exitcodes.OK
    assert exit_file.read_text() == "2\n2\n"
    assert "specops train: error:" in capsys.readouterr().err
