"""kill -9 a generator, the broker or a trainer rank mid-stream: every example still arrives exactly once.

Real processes over TCP loopback: the broker is `specops broker` (its own process), producers and
consumers are forked from a fork server that imported torch once. Consumers log each id they
hand out; the multiset over all consumer logs must equal the input ids exactly. Every test runs
on both data paths: relayed by the broker, and direct (producers send to the consumers' own
endpoints, so a kill also strikes between a `go` and its data, or between the data and its ack).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from specops.testing.net import free_port

PROCS = Path(__file__).with_name("_stream_procs.py")
N = 120
HEARTBEAT_S, TIMEOUT_S = 0.2, 1.5


class Cluster:
    """A broker process plus forked producers/consumers; everything is killed at the end."""

    def __init__(self, forks: subprocess.Popen[str], root: Path, direct: bool) -> None:
        self.forks = forks
        self.root = root
        self.direct = direct
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.broker: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self.consumer_logs: list[Path] = []

    def start_broker(self) -> None:
        log = open(self.root / "broker.log", "ab")  # noqa: SIM115 (owned by the process)
        self.broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "specops.cli",
                "broker",
                "--bind",
                self.url,
                "--state-dir",
                str(self.root / "state"),
                "--allowed-root",
                str(self.root),
                "--max-bytes",
                str(1 << 20),
                "--heartbeat-s",
                str(HEARTBEAT_S),
                "--timeout-s",
                str(TIMEOUT_S),
                "--exit-after-eos",
            ],
            stdout=log,
            stderr=log,
        )

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.kill()
        self.broker.wait(10)

    def spawn(self, role: str, name: str, **job: Any) -> int:
        out = self.root / f"{name}.log"
        if role == "consumer":
            self.consumer_logs.append(out)
            job.setdefault("direct", self.direct)
        assert self.forks.stdin and self.forks.stdout
        self.forks.stdin.write(json.dumps({"role": role, "url": self.url, "out": str(out), **job}) + "\n")
        self.forks.stdin.flush()
        pid = int(json.loads(self.forks.stdout.readline())["pid"])
        self.pids.append(pid)
        return pid

    def lines(self, name: str) -> list[str]:
        path = self.root / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []

    def delivered(self) -> Counter[str]:
        ids: Counter[str] = Counter()
        for path in self.consumer_logs:
            if path.exists():
                ids.update(line for line in path.read_text().splitlines() if line.startswith("d/"))
        return ids

    def start_first_broker(self, attempts: int = 3) -> None:
        """Start the broker on a probed free port. Another process can take that port before the
        broker binds it (seen once under load), so a broker that exits instead of listening gets
        another port."""
        for _ in range(attempts):
            self.start_broker()
            if self._listening():
                return
            self.url = f"tcp://127.0.0.1:{free_port()}"
        raise AssertionError(f"the broker did not start\n{self.report()}")

    def _listening(self, timeout_s: float = 20.0) -> bool:
        assert self.broker is not None
        port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.broker.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
            time.sleep(0.05)
        return False

    def wait_for(self, what: str, ready: Callable[[], bool], timeout_s: float = 25.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.report()}")
            time.sleep(0.05)

    def report(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text()
            errors = [line for line in text.splitlines() if not line.startswith("d/")]
            parts.append(f"--- {path.name}: {text.count(chr(10))} lines; non-id lines: {errors[-15:]}")
        return "\n".join(parts)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for pid in self.pids:
            self.kill(pid)
        if self.broker is not None and self.broker.poll() is None:
            self.broker.kill()
            self.broker.wait(10)

    def assert_exactly_once(self) -> None:
        got = self.delivered()
        want = Counter(f"d/{i}/0" for i in range(N))
        missing, extra = want - got, got - want
        assert not missing and not extra, f"missing {sorted(missing)} extra {sorted(extra)}\n{self.report()}"
        assert not any("BAD" in line for p in self.consumer_logs for line in p.read_text().splitlines())
        direct = sum(
            int(line.split()[1])
            for p in self.consumer_logs
            for line in p.read_text().splitlines()
            if line.startswith("direct ")
        )
        assert (direct > 0) == self.direct, f"{direct} examples came straight from producers"


@pytest.fixture(scope="module")
def forks() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(PROCS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    yield proc
    assert proc.stdin
    proc.stdin.close()
    proc.wait(30)


@pytest.fixture(params=["relay", "direct"])
def cluster(
    forks: subprocess.Popen[str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(forks, tmp_path, direct=request.param == "direct")
    c.start_first_broker()
    yield c
    c.close()


def _all_consumers_ended(cluster: Cluster, names: list[str]) -> Callable[[], bool]:
    return lambda: all("EOS" in cluster.lines(n) for n in names)


def _all_finished(cluster: Cluster, names: list[str]) -> Callable[[], bool]:
    return lambda: all("finished" in cluster.lines(n) for n in names)


def test_a_killed_generator_s_ranges_are_regenerated_by_another(cluster: Cluster) -> None:
    victim = cluster.spawn("producer", "gen-a", n=N, ranges=6, pause_s=0.03)
    cluster.spawn("producer", "gen-b", n=N, ranges=6, pause_s=0.03)
    cluster.spawn("consumer", "rank-0")
    cluster.wait_for("some delivery", lambda: len(cluster.delivered()) >= 25)
    cluster.kill(victim)
    claimed = [line for line in cluster.lines("gen-a") if line.startswith("claim")]
    cluster.wait_for("end of stream", _all_consumers_ended(cluster, ["rank-0"]))
    cluster.assert_exactly_once()
    assert claimed and "finished" not in cluster.lines("gen-a")  # it died holding a range
    cluster.wait_for("gen-b to finish", lambda: "finished" in cluster.lines("gen-b"), 10)


def test_a_killed_and_restarted_broker_loses_and_repeats_nothing(cluster: Cluster) -> None:
    cluster.spawn("producer", "gen-a", n=N, ranges=4, pause_s=0.02)
    cluster.spawn("producer", "gen-b", n=N, ranges=4, pause_s=0.02)
    cluster.spawn("consumer", "rank-0", pause_s=0.01)
    cluster.spawn("consumer", "rank-1", pause_s=0.01)
    cluster.wait_for("some delivery", lambda: len(cluster.delivered()) >= 30)
    cluster.kill_broker()
    before = len(cluster.delivered())
    time.sleep(0.5)
    cluster.start_broker()
    cluster.wait_for("end of stream", _all_consumers_ended(cluster, ["rank-0", "rank-1"]))
    cluster.assert_exactly_once()
    assert before < N  # the kill really was mid-stream
    cluster.wait_for("generators to finish", _all_finished(cluster, ["gen-a", "gen-b"]), 10)


def test_a_killed_consumer_s_unacked_examples_go_to_another_rank(cluster: Cluster) -> None:
    cluster.spawn("producer", "gen-a", n=N, slice=[0, 2], pause_s=0.005)
    cluster.spawn("producer", "gen-b", n=N, slice=[1, 2], pause_s=0.005)
    victim = cluster.spawn("consumer", "rank-0", credits=3, pause_s=0.1)
    cluster.spawn("consumer", "rank-1", credits=3, pause_s=0.02)
    cluster.wait_for("rank-0 working", lambda: len(cluster.lines("rank-0")) >= 8)
    time.sleep(0.03)  # land inside its simulated training step
    cluster.kill(victim)
    cluster.wait_for("end of stream", _all_consumers_ended(cluster, ["rank-1"]))
    cluster.assert_exactly_once()
    assert "EOS" not in cluster.lines("rank-0")
    cluster.wait_for("generators to finish", _all_finished(cluster, ["gen-a", "gen-b"]), 10)
