"""kill -9 at every commit step (and at random moments) loses and duplicates nothing."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _stores_fixtures import META, expected_counts, make_example

from specops.stores import manifest as mf
from specops.stores.disk import DiskStore

CHILD = Path(__file__).with_name("_disk_kill_child.py")
KILLED = -signal.SIGKILL


class Zygote:
    """Drives _disk_kill_child.py: each call forks writer processes and returns their exit codes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=CHILD.parent,
        )

    def run(self, jobs: list[dict[str, Any]], kill_after_s: float | None = None) -> list[int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(jobs) + "\n")
        self.proc.stdin.flush()
        pids = json.loads(self.proc.stdout.readline())["pids"]
        if kill_after_s is not None:
            time.sleep(kill_after_s)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return list(json.loads(self.proc.stdout.readline())["status"])

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


def _job(store: Path, num_ids: int, kill: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    job = {"dir": str(store), "writer": 0, "num_writers": 1, "num_ids": num_ids, "shard_size": 4}
    job.update({"compression": "none", "kill": kill, **kw})
    return job


def assert_exactly_once(store: Path, num_ids: int) -> None:
    """Every id committed exactly once, every listed shard intact, no leftovers, counts exact."""
    want = {f"d/{i}/0" for i in range(num_ids)}
    manifests = [mf.load_manifest(p) for p in sorted(store.glob("manifest-w*.json"))]
    listed_ids = [i for m in manifests for e in m.shards for i in e.ids]
    assert len(listed_ids) == len(set(listed_ids)), "an example was committed twice"
    assert set(listed_ids) == want
    view = DiskStore.open(store, [store.parent], verify="digest")
    assert view.dropped == []
    assert view.done_ids() == want
    read = [ex["id"] for p in view.partitions() for ex in view.read(p)]
    assert sorted(read) == sorted(want)
    assert view.token_counts() == expected_counts(make_example(i) for i in range(num_ids))
    listed_files = {e.file for m in manifests for e in m.shards}
    on_disk = {n for n in os.listdir(store) if mf.SHARD_RE.match(n)}
    assert on_disk == listed_files, "orphan shard files left behind"
    assert not [n for n in os.listdir(store) if n.startswith(".tmp-")]
    assert (store / "manifest.json").exists()


KILL_CHAIN = [
    {"target": "write", "nth": 7},
    {"target": "shard-", "when": "before", "nth": 2},
    {"target": "shard-", "when": "after", "nth": 1},
    {"target": "manifest-w", "when": "before", "nth": 2},
    {"target": "manifest-w", "when": "after", "nth": 1},
    {"target": "tokens-w", "when": "before", "nth": 1},
    {"target": "tokens-w", "when": "after", "nth": 2},
    {"target": "manifest.json", "when": "before", "nth": 1},
]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_kill_at_every_commit_step_then_resume(zygote: Zygote, tmp_path: Path, compression: str) -> None:
    store, num_ids = tmp_path / "store", 80
    for kill in KILL_CHAIN:
        assert zygote.run([_job(store, num_ids, kill, compression=compression)]) == [KILLED], kill
    assert zygote.run([_job(store, num_ids, compression=compression)]) == [0]
    assert_exactly_once(store, num_ids)


def test_kill_at_random_moments_then_resume(zygote: Zygote, tmp_path: Path) -> None:
    store, num_ids = tmp_path / "store", 60
    rng = random.Random(7)
    killed = 0
    for _ in range(8):
        status = zygote.run(
            [_job(store, num_ids, seq=300, shard_size=3)], kill_after_s=rng.uniform(0.0, 0.08)
        )
        killed += status == [KILLED]
    assert killed >= 4, "the timed kills should land mid-run"
    assert zygote.run([_job(store, num_ids, seq=300, shard_size=3)]) == [0]
    assert_exactly_once_seq(store, num_ids, seq=300)


def assert_exactly_once_seq(store: Path, num_ids: int, seq: int) -> None:
    manifests = [mf.load_manifest(p) for p in sorted(store.glob("manifest-w*.json"))]
    listed_ids = [i for m in manifests for e in m.shards for i in e.ids]
    assert sorted(listed_ids) == sorted(f"d/{i}/0" for i in range(num_ids))
    view = DiskStore.open(store, [store.parent], verify="digest")
    assert view.dropped == [] and len(view) == num_ids
    assert view.token_counts() == expected_counts(make_example(i, seq=seq) for i in range(num_ids))


def test_concurrent_writers_one_killed(zygote: Zygote, tmp_path: Path) -> None:
    store, num_ids = tmp_path / "store", 36
    kill = {"target": "manifest-w", "when": "after", "nth": 2}
    jobs = [_job(store, num_ids, kill if w == 1 else None, writer=w, num_writers=3) for w in range(3)]
    assert zygote.run(jobs) == [0, KILLED, 0]
    assert not (store / "manifest.json").exists(), "writer 1 never finished"
    partial = DiskStore.open(store, [store.parent])
    assert len(partial) < num_ids
    assert zygote.run([_job(store, num_ids, writer=1, num_writers=3)]) == [0]
    assert_exactly_once(store, num_ids)
    merged = mf.load_manifest(store / "manifest.json")
    assert merged.complete and merged.writer is None
    assert sorted(i for e in merged.shards for i in e.ids) == sorted(f"d/{i}/0" for i in range(num_ids))
    assert merged.meta == META
