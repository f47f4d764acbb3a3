"""The control-plane scripts themselves: nothing they start outlives its owner or down.sh."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest
from _controlplane import HACK, until

pytestmark = pytest.mark.e2e


def running(pid: int) -> bool:
    """Alive and not a zombie (whoever reaps orphans here may be slow to)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_up_records_every_process_and_its_watchdog_stops_them_when_the_owner_dies(
    tools: Path, tmp_path: Path
) -> None:
    owner = subprocess.Popen(["sleep", "600"])
    state = tmp_path / "cp"
    try:
        subprocess.run(
            [str(HACK / "control-plane" / "up.sh"), "--owner", str(owner.pid), str(state)], check=True
        )
        pids = [int(line) for line in (state / "pids").read_text().split()]
        assert len(pids) == 3 and all(running(pid) for pid in pids)
        assert (state / "kubeconfig").exists() and "RBAC=false" in (state / "env").read_text()
    finally:
        owner.kill()
        owner.wait()
    # down.sh removes the pid file last, once every process it recorded has exited.
    until(
        lambda: not (state / "pids").exists(),
        timeout=30,
        what="the watchdog to run down.sh",
    )
    assert not any(running(pid) for pid in pids)
    subprocess.run([str(HACK / "control-plane" / "down.sh"), str(state)], check=True)  # nothing left: a no-op


def test_up_fails_cleanly_without_binaries(tmp_path: Path) -> None:
    env = {"SPECOPS_K8S_BIN": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [str(HACK / "control-plane" / "up.sh"), str(tmp_path / "cp")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "build.sh" in result.stderr and "kube-apiserver" in result.stderr
    assert not (tmp_path / "cp" / "pids").exists()


def _build(cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """build.sh into an empty cache (the packages it needs are installed by the session's build)."""
    return subprocess.run(
        [str(HACK / "control-plane" / "build.sh")],
        env={**os.environ, "SPECOPS_CACHE": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_fails_with_a_clear_error_when_the_source_cannot_be_fetched(tmp_path: Path) -> None:
    result = _build(tmp_path / "cache", SPECOPS_DEBIAN_MIRROR="http://127.0.0.1:9/debian")
    assert result.returncode == 1
    assert "ERROR: no source index from http://127.0.0.1:9/debian bookworm" in result.stderr
    assert not (tmp_path / "cache" / "k8s-v1.20.2" / "bin").exists()


def test_build_waits_for_another_build_only_as_long_as_told(tmp_path: Path) -> None:
    lock = tmp_path / "cache" / "k8s-v1.20.2" / ".lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = _build(tmp_path / "cache", SPECOPS_BUILD_LOCK_TIMEOUT="1")
    assert result.returncode == 1
    assert "another build holds" in result.stderr and "still held after 1s" in result.stderr
