"""hack/crd-server/build.sh's failure paths: a clear ERROR line naming the step, no binaries left."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest
from _server import HACK

pytestmark = pytest.mark.crdserver
BUILD = HACK / "crd-server" / "build.sh"


def _build(cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUILD), *args],
        env={**os.environ, "SPECOPS_CACHE": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_names_the_step_when_the_mirror_is_unreachable(tmp_path: Path) -> None:
    result = _build(tmp_path / "cache", SPECOPS_DEBIAN_MIRROR="http://127.0.0.1:9/debian")
    assert result.returncode == 1
    assert "ERROR: no package index from http://127.0.0.1:9/debian sid" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "cache" / "crd-server-0.36" / "bin").exists()


def test_cached_mode_only_reports(tmp_path: Path) -> None:
    result = _build(tmp_path / "cache", "--cached")
    assert result.returncode == 1 and "run hack/crd-server/build.sh" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_build_waits_for_another_build_only_as_long_as_told(tmp_path: Path) -> None:
    lock = tmp_path / "cache" / "crd-server-0.36" / ".lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = _build(tmp_path / "cache", SPECOPS_BUILD_LOCK_TIMEOUT="1")
    assert result.returncode == 1
    assert "another build holds" in result.stderr and "still held after 1s" in result.stderr
