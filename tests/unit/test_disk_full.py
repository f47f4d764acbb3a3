"""A full disk (a 2 MiB tmpfs) stops shard, manifest and broker-journal writers (and
`specops generate-data`) with one clear error and no torn state; once space is freed they resume
with nothing lost or duplicated."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _stores_fixtures import META, make_example

from specops import cli, exitcodes
from specops.exitcodes import DiskFull
from specops.stores.broker import JOURNAL_FILE, Journal
from specops.stores.disk import DiskStore
from specops.testing.synthetic import make_conversations, write_jsonl

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test (needs root and mount(8))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs (needs root): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free (tmpfs counts whole pages)."""
    ballast = disk / f"ballast-{uuid.uuid4().hex[:6]}"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return ballast


def _writer(disk: Path) -> DiskStore:
    return DiskStore(disk / "store", meta=META, shard_size=4, allowed_roots=[disk])


WANTED = [make_example(i, seq=48) for i in range(24)]


@pytest.mark.parametrize("leave", [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16])
def test_store_stops_cleanly_when_full_and_resumes_without_loss(small_disk: Path, leave: int) -> None:
    store = _writer(small_disk)
    store.write(WANTED[:4])  # one committed shard before the disk fills
    ballast = fill(small_disk, leave * PAGE)
    with pytest.raises(DiskFull) as raised:
        store.write(WANTED[4:])
        store.finalize()
    message = str(raised.value)
    assert "\n" not in message and "no space left on the device" in message
    assert str(small_disk / "store") in message
    assert exitcodes.classify(raised.value) == exitcodes.FAILED
    names = os.listdir(small_disk / "store")
    assert not [n for n in names if n.startswith(".tmp-")], f"temp files left behind: {names}"
    committed = DiskStore.open(small_disk / "store", [small_disk], verify="digest")
    assert committed.dropped == [] and committed.skipped_manifests == []
    assert {f"d/{i}/0" for i in range(4)} <= committed.done_ids()
    ballast.unlink()
    resumed = _writer(small_disk)
    resumed.write(WANTED)
    resumed.finalize()
    final = DiskStore.open(small_disk / "store", [small_disk], verify="digest")
    served = [ex["id"] for p in final.partitions() for ex in final.read(p)]
    assert sorted(served) == sorted(ex["id"] for ex in WANTED), "every example once"


def test_the_sweep_hits_both_shards_and_manifests(small_disk: Path) -> None:
    """The free space left above makes both kinds of write fail first somewhere in the range."""
    seen = set()
    for leave in range(0, 20):
        root = small_disk / f"s{leave}"
        store = DiskStore(root, meta=META, shard_size=4, allowed_roots=[small_disk])
        ballast = fill(small_disk, leave * PAGE)
        try:
            store.write(WANTED)
        except DiskFull as exc:
            seen.add("shard" if "writing a shard" in str(exc) else "manifest or cache")
        ballast.unlink()
        shutil.rmtree(root)
    assert seen == {"shard", "manifest or cache"}


def test_broker_journal_keeps_only_whole_records_when_full(small_disk: Path) -> None:
    state = small_disk / "broker"
    journal = Journal(state)
    journal.set_stream(ranges=4)
    journal.deliver([(f"d/{i}/0", i % 4) for i in range(10)], owner="consumer-a")
    journal.sync(force=True)
    before = (state / JOURNAL_FILE).stat().st_size
    ballast = fill(small_disk, 0)
    big = [(f"d/{i}/0-{'x' * 200}", i % 4) for i in range(10, 2000)]
    with pytest.raises(DiskFull, match="while writing the broker journal"):
        journal.deliver(big, owner="consumer-a")
    assert (state / JOURNAL_FILE).stat().st_size == before, "the torn batch is cut off again"
    assert not any(ex_id in journal.delivered for ex_id, _ in big), "not journaled, so never acked"
    journal.close()
    ballast.unlink()
    again = Journal(state)
    assert set(again.delivered) == {f"d/{i}/0" for i in range(10)}
    again.deliver(big, owner="consumer-b")
    again.mark_complete(0)
    again.close()
    third = Journal(state)
    assert len(third.delivered) == 10 + len(big) and third.complete == {0}
    third.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_generate_data_on_a_full_disk_exits_1_in_one_line_and_the_rerun_completes(
    small_disk: Path,
    tmp_path: Path,
    tiny_verifier_dir: Path,
    capfd: pytest.CaptureFixture[str],
    workers: int,
) -> None:
    """Spawned workers print their own line (capfd: they write to the file descriptor)."""
    rows = write_jsonl(tmp_path / "syn.jsonl", make_conversations(24, seed=3))

    def config(out: Path) -> Path:
        cfg = {
            "verifier": {"nameOrPath": str(tiny_verifier_dir)},
            "datasets": [{"path": str(rows), "name": "syn"}],
            "sync": {"path": str(out), "shardSize": 2},
            "run": {"allowedRoots": [str(tmp_path), str(tiny_verifier_dir)], "numWorkers": workers},
        }
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    assert cli.main(["generate-data", "--config", str(config(tmp_path / "reference"))]) == 0
    reference = DiskStore.open(tmp_path / "reference", [tmp_path]).done_ids()
    capfd.readouterr()
    ballast = fill(small_disk, 64 * PAGE)
    full = config(small_disk / "out")
    assert cli.main(["generate-data", "--config", str(full)]) == exitcodes.FAILED
    err = capfd.readouterr().err.strip().splitlines()
    assert any("error:" in line and "no space left on the device while writing" in line for line in err)
    assert not [line for line in err if line.startswith("Traceback")]
    ballast.unlink()
    assert cli.main(["generate-data", "--config", str(full)]) == 0
    store = DiskStore.open(small_disk / "out", [small_disk], verify="digest")
    served = [ex["id"] for p in store.partitions() for ex in store.read(p)]
    assert sorted(served) == sorted(reference), "every example once"
