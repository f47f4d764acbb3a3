"""The control-plane scripts themselves: nothing they start outlives its owner or down.sh."""

from __future__ import annotations

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
    until(
        lambda: not any(running(pid) for pid in pids),
        timeout=30,
        what="the watchdog to stop etcd, apiserver, controller-manager",
    )
    assert not (state / "pids").exists()
    subprocess.run([str(HACK / "control-plane" / "down.sh"), str(state)], check=True)  # nothing left: a no-op


def test_up_fails_cleanly_without_binaries(tmp_path: Path) -> None:
    env = {"SPECOPS_K8S_BIN": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [str(HACK / "control-plane" / "up.sh"), str(tmp_path / "cp")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "build.sh" in result.stderr and "kube-apiserver" in result.stderr
    assert not (tmp_path / "cp" / "pids").exists()
