"""report.png and report.json of `specops run`: the figure's panels and size, rounding, provenance."""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from specops import provenance
from specops.config import VerifierConfig
from specops.run_report import read_metrics, report_figure, rounded, write_report


def _metrics() -> list[dict[str, Any]]:
    """metrics.jsonl as the trainer writes it: train records every 5 steps, validation every 10."""
    records: list[dict[str, Any]] = []
    for step in range(5, 45, 5):
        acc = [0.3 * step / 40, 0.05 * step / 40, 0.01 * step / 40]
        values = {f"full_acc_{i}": a for i, a in enumerate(acc)}
        records.append(
            {"kind": "train", "step": step, "loss": 40 - step / 2, "accept_proxy": 1 + sum(acc), **values}
        )
        if step % 10 == 0:  # validation improves until step 30, then gets worse
            loss = {10: 38.0, 20: 30.0, 30: 25.0, 40: 26.0}[step]
            record = {"kind": "eval", "step": step, "loss": loss, "accept_proxy": 1 + sum(acc) * 0.9}
            records.append({**record, **values, "best": step <= 30})
    return records


def _evaluation(per_position: list[int], drafts: int) -> dict[str, Any]:
    accepted = sum(per_position)
    return {
        "prompts": 6,
        "speculative_tokens": 3,
        "drafts": drafts,
        "accepted_tokens": accepted,
        "acceptance_length": 1 + accepted / drafts,
        "per_position": [c / drafts for c in per_position],
        "accepted_per_position": per_position,
    }


def _report() -> dict[str, Any]:
    return {
        "name": "demo",
        "acceptance_length": 1.3,
        "baseline_acceptance_length": 1.0,
        "estimated_speedup": {"value": 1.12, "draft_cost_ratio": 0.052},
        "evaluation": {"trained": _evaluation([24, 5, 1], 80), "untrained": _evaluation([0, 0, 0], 96)},
        "evaluation_prompts": {
            "prompts": 6,
            "conversations": 6,
            "held_out_conversations": 7,
            "stored_conversations": 50,
        },
        "training": {"step": 44},
    }


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


def test_the_figure_has_four_readable_panels() -> None:
    figure = report_figure(_report(), _metrics())
    loss, proxy, bars, accuracy = figure.axes
    assert len(figure.axes) == 4
    assert loss.get_title().startswith("Draft loss") and proxy.get_title().startswith("Acceptance proxy")
    assert bars.get_title().startswith("Acceptance per draft position")
    assert "accuracy per draft position" in accuracy.get_title()
    # Train and validation curves (and the best checkpoint's star) from metrics.jsonl.
    assert [line.get_label() for line in loss.lines] == ["train", "validation", "best (step 30)"]
    assert list(loss.lines[1].get_xdata()) == [10, 20, 30, 40]
    assert [line.get_label() for line in proxy.lines] == ["train", "validation"]
    assert [line.get_label() for line in accuracy.lines] == ["position 1", "position 2", "position 3"]
    # Positions are bars (trained and untrained side by side), each labelled with its counts, the
    # untrained zeros included; ticks at the positions themselves.
    assert len(bars.patches) == 6 and [t for t in bars.get_xticks()] == [1, 2, 3]
    labels = [text.get_text() for text in bars.texts]
    assert labels == ["24/80", "5/80", "1/80", "0/96", "0/96", "0/96"]
    assert bars.get_ylim()[0] == 0 and max(p.get_height() for p in bars.patches) == pytest.approx(0.3)
    title = figure.get_suptitle()
    assert "acceptance length 1.30 trained vs 1.00 untrained" in title and "estimated speedup 1.12x" in title
    subtitle = " ".join(text.get_text() for text in figure.texts)
    assert "6 held-out prompts from 6 conversations (of 7 held out / 50 stored), none trained on" in subtitle


def test_report_png_is_1600_by_900(tmp_path: Path) -> None:
    write_report(tmp_path, _report(), _metrics())
    assert _png_size(tmp_path / "report.png") == (1600, 900)


def test_a_run_without_evaluation_still_plots(tmp_path: Path) -> None:
    write_report(tmp_path, {"name": "x", "evaluation": {}}, [])
    assert _png_size(tmp_path / "report.png") == (1600, 900)
    assert read_metrics(tmp_path / "train" / "metrics.jsonl") == []


def test_floats_keep_four_significant_digits() -> None:
    value = {"a": 1.2345678, "b": [0.000123456, 16.912345, 3], "c": True, "d": {"e": 1234.5678, "f": None}}
    assert rounded(value) == {
        "a": 1.235,
        "b": [0.0001235, 16.91, 3],
        "c": True,
        "d": {"e": 1235.0, "f": None},
    }


def test_files_digest_is_sha256sum_of_their_concatenation(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("x: 1\n")
    second.write_text("y: 2\n")
    expected = hashlib.sha256(b"x: 1\ny: 2\n").hexdigest()
    assert provenance.files_sha256([first, second]) == f"sha256:{expected}"
    second.write_text("y: 3\n")
    assert provenance.files_sha256([first, second]) != f"sha256:{expected}"


def test_git_revision_of_a_checkout_and_of_a_plain_directory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert provenance.git_revision(repo) == {"commit": head, "dirty": False}
    (repo / "f.txt").write_text("2")
    assert provenance.git_revision(repo) == {"commit": head, "dirty": True}
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.git_revision(plain) is None


def test_versions_and_verifier_identity() -> None:
    import torch
    import transformers

    import specops

    found = provenance.versions()
    assert found["specops"] == specops.__version__
    assert found["torch"] == torch.__version__ and found["transformers"] == transformers.__version__
    hub = VerifierConfig(name_or_path="org/model", revision="main")
    snapshot = "/cache/models--org--model/snapshots/0123abcd"
    assert provenance.verifier_provenance(hub, snapshot) == {
        "id": "org/model",
        "requested_revision": "main",
        "revision": "0123abcd",
        "gguf_file": None,
        "path": snapshot,
    }
    local = VerifierConfig(name_or_path="/models/m")
    assert provenance.verifier_provenance(local, "/models/m")["revision"] is None


def test_training_lines_of_torchrun_ranks_reach_run_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`specops run --nproc N` streams rank 0's stdout: shown, kept in run.log, its JSON last."""
    import os
    import sys

    from specops.local_run import _logging, stream_lines

    script = "print('[train step 2] loss=3.5'); print(); print('{\"step\": 2}')"
    with _logging(tmp_path / "logs" / "run.log"):
        code, lines = stream_lines([sys.executable, "-c", script], dict(os.environ))
    assert code == 0 and lines == ["[train step 2] loss=3.5", '{"step": 2}']
    assert "[train step 2] loss=3.5" in capsys.readouterr().out
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "specops.train.lines: [train step 2] loss=3.5" in log
    code, _ = stream_lines([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    assert code == 3
