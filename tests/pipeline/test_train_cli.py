"""`specops train` as a process: SIGTERM checkpoints and exits 143, kill -9 loses only uncommitted
steps, and a rerun resumes to exactly the loss curve of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _train_support import build_verifier, make_examples, train_cli, write_store

STEPS = 120


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    verifier = build_verifier(root / "verifier")
    write_store(root / "data", root / "verifier", make_examples(verifier, 40))
    return root


def command(root: Path, name: str) -> list[str]:
    cfg = {
        "verifier": {"nameOrPath": str(root / "verifier")},
        "data": {"path": str(root / "data"), "validationFraction": 0.0},
        "draft": {"draftVocabSize": 48},
        "outputDir": str(root / name),
        "ttt_steps": 2,
        "tokensPerStep": 128,
        "maxSeqLen": 64,
        "maxSteps": STEPS,
        "logEvery": 1,
        "checkpointEvery": 10,
        "device": "cpu",
        "allowedRoots": [str(root)],
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return [sys.executable, *train_cli(root), "--config", str(root / f"{name}.yaml")]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def records(output: Path) -> list[dict[str, float]]:
    """The complete lines of metrics.jsonl: polled while the trainer appends, the last line may be
    half written (a finished file ends with a newline, so nothing is dropped from it)."""
    path = output / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return [json.loads(line) for line in lines if line]


def interrupt_at(cmd: list[str], output: Path, step: int, sig: signal.Signals) -> tuple[int, str]:
    """Run `cmd`, send `sig` once it logged `step`; (exit code, stdout)."""
    log = output.with_suffix(f".{sig.name}.log")
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env(), stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not any(r["step"] >= step for r in records(output)):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "training never reached the step"
            time.sleep(0.01)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    return code, log.read_text()


def test_sigterm_and_kill9_resume_to_the_uninterrupted_curve(root: Path) -> None:
    done = subprocess.run(command(root, "straight"), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = {int(r["step"]): r["loss"] for r in records(root / "straight")}
    assert sorted(expected) == list(range(1, STEPS + 1))

    cmd = command(root, "cut")
    out = root / "cut"
    code, text = interrupt_at(cmd, out, 15, signal.SIGTERM)
    assert code == 143, text[-2000:]
    report = json.loads(text.strip().splitlines()[-1])
    assert report["interrupted"] and report["checkpoint"].endswith(f"step-{report['step']:08d}")

    code, _ = interrupt_at(cmd, out, 60, signal.SIGKILL)
    assert code == -signal.SIGKILL

    rest = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert json.loads(rest.stdout.strip().splitlines()[-1])["step"] == STEPS
    # Steps logged after the last checkpoint before kill -9 were redone: every record of a step,
    # first run or redo, must equal the uninterrupted run's loss exactly.
    seen = records(out)
    assert {int(r["step"]) for r in seen} == set(expected)
    assert all(r["loss"] == expected[int(r["step"])] for r in seen)
    assert (out / "final" / "model.safetensors").is_file()
