"""`specops run --local` turns the report's verdict into its exit status (what `make demo` relies on)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from specops import cli, exitcodes, local_run
from specops.commands import run


def verdict(better: bool, lossless: bool, evaluate: bool = True) -> dict[str, Any]:
    return {"better_than_baseline": better, "lossless": lossless, "evaluate": evaluate}


@pytest.mark.parametrize(
    ("report", "status"),
    [
        (verdict(better=True, lossless=True), 0),
        (verdict(better=False, lossless=True), exitcodes.NOT_BETTER),
        (verdict(better=True, lossless=False), exitcodes.NOT_BETTER),
        (verdict(better=False, lossless=False, evaluate=False), 0),  # nothing was evaluated
    ],
)
def test_exit_status_follows_the_verdict(
    report: dict[str, Any], status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = argparse.Namespace(evaluate=report["evaluate"])
    monkeypatch.setattr(local_run, "plan_local", lambda *a: plan)
    monkeypatch.setattr(local_run, "run_local", lambda p: report if p is plan else None)
    monkeypatch.setattr(local_run, "summary", lambda r: "summary")
    args = argparse.Namespace(file=Path("x.yaml"), out=None, nproc=None)
    assert run.main(args) == status
    assert ("not better than the untrained baseline" in capsys.readouterr().err) == (status != 0)


def test_unknown_arguments_are_refused_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "x.yaml", "--spec.epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "specops run: error: unrecognized arguments: --spec.epochs 3 (see specops run --help)\n"


def test_local_is_optional_and_still_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` only runs here, so `--local` (once required) is a no-op kept for older scripts."""
    seen: list[Path] = []
    monkeypatch.setattr(run, "main", lambda args: seen.append(args.file) or 0)
    assert cli.main(["run", "a.yaml"]) == 0 and cli.main(["run", "b.yaml", "--local"]) == 0
    assert seen == [Path("a.yaml"), Path("b.yaml")]
