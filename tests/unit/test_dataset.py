"""GeneratedDataset: disjoint, complete coverage across ranks and DataLoader workers; shuffling; streams."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _stores_fixtures import META, assert_same_example, make_example
from torch.utils.data import DataLoader

from specops.dataset import GeneratedDataset, assign_partitions
from specops.example import ExampleDict
from specops.stores.disk import DiskStore


class FakeSource:
    """Partition k holds k+1 examples, so partitions are deliberately uneven."""

    def __init__(self, num_partitions: int) -> None:
        self.parts = [f"p{k:02d}" for k in range(num_partitions)]
        self.reads: list[str] = []

    def partitions(self) -> list[str]:
        return self.parts

    def read(self, partition: str) -> Iterator[ExampleDict]:
        self.reads.append(partition)
        k = int(partition[1:])
        for j in range(k + 1):
            yield _example(f"{partition}/{j}/0")


def _example(ex_id: str) -> ExampleDict:
    return {
        "id": ex_id,
        "token_ids": torch.zeros(1, dtype=torch.int32),
        "loss_mask": torch.ones(1, dtype=torch.uint8),
        "hidden_states": torch.zeros(1, 1, 1),
    }


def _all_ids(num_partitions: int) -> set[str]:
    return {f"p{k:02d}/{j}/0" for k in range(num_partitions) for j in range(k + 1)}


class _Worker:
    def __init__(self, id: int, num_workers: int) -> None:
        self.id, self.num_workers = id, num_workers


@pytest.mark.parametrize(
    ("num_partitions", "world", "workers"), [(7, 3, 2), (5, 2, 4), (1, 2, 3), (13, 4, 1)]
)
def test_rank_worker_pairs_cover_everything_once(
    monkeypatch: pytest.MonkeyPatch, num_partitions: int, world: int, workers: int
) -> None:
    seen: dict[tuple[int, int], list[str]] = {}
    for rank, worker in itertools.product(range(world), range(workers)):
        monkeypatch.setattr("specops.dataset.get_worker_info", lambda w=worker: _Worker(w, workers))
        ds = GeneratedDataset(FakeSource(num_partitions), seed=3, rank=rank, world_size=world)
        ds.set_epoch(2)
        seen[(rank, worker)] = [ex["id"] for ex in ds]
    flat = [i for ids in seen.values() for i in ids]
    assert len(flat) == len(set(flat)), "two consumers read the same example"
    assert set(flat) == _all_ids(num_partitions)


def test_real_dataloader_workers_split_a_disk_store(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s", meta=META, shard_size=3, allowed_roots=[tmp_path])
    store.write([make_example(i) for i in range(20)])
    store.close()
    ids: list[str] = []
    for rank in range(2):
        ds = GeneratedDataset(DiskStore.open(tmp_path / "s", [tmp_path]), rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_id_only)
        ids.extend(loader)
    assert sorted(ids) == sorted(f"d/{i}/0" for i in range(20))


def _id_only(ex: Any) -> str:
    return str(ex["id"])


def test_examples_come_back_as_tensors_unchanged(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s", meta=META, shard_size=4, allowed_roots=[tmp_path])
    examples = [make_example(i) for i in range(9)]
    store.write(examples)
    store.close()
    got = {ex["id"]: ex for ex in GeneratedDataset(DiskStore.open(tmp_path / "s", [tmp_path]))}
    for ex in examples:
        assert_same_example(got[ex["id"]], ex)


def test_shuffle_is_seeded_per_epoch() -> None:
    def order(seed: int, epoch: int) -> list[str]:
        ds = GeneratedDataset(FakeSource(10), seed=seed, rank=0, world_size=1)
        ds.set_epoch(epoch)
        return [ex["id"] for ex in ds]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 5)) == sorted(_all_ids(10))


def test_examples_shuffle_only_within_a_window_of_partitions() -> None:
    source = FakeSource(9)
    ds = GeneratedDataset(source, seed=0, buffer_partitions=3, rank=0, world_size=1)
    ids = [ex["id"] for ex in ds]
    windows = [set(source.reads[k : k + 3]) for k in range(0, 9, 3)]
    position = 0
    for window in windows:
        size = sum(int(p[1:]) + 1 for p in window)
        assert {i.split("/")[0] for i in ids[position : position + size]} == window
        position += size
    assert ids != [f"p{k:02d}/{j}/0" for k in range(9) for j in range(k + 1)]


def test_no_shuffle_keeps_source_order() -> None:
    ds = GeneratedDataset(FakeSource(4), shuffle=False, rank=0, world_size=1)
    assert [ex["id"] for ex in ds] == [f"p{k:02d}/{j}/0" for k in range(4) for j in range(k + 1)]


def test_defaults_to_a_single_consumer_without_torch_distributed() -> None:
    assert {ex["id"] for ex in GeneratedDataset(FakeSource(5))} == _all_ids(5)


def test_partition_subset() -> None:
    val = ["p03", "p07"]
    ds = GeneratedDataset(FakeSource(10), partitions=val, rank=0, world_size=1)
    assert {ex["id"].split("/")[0] for ex in ds} == set(val)


def test_assign_partitions_counts_differ_by_at_most_one() -> None:
    parts = [str(k) for k in range(11)]
    sizes = [
        len(assign_partitions(parts, consumer=c, num_consumers=4, seed=0, epoch=0, shuffle=True))
        for c in range(4)
    ]
    assert sorted(sizes) == [2, 3, 3, 3]
    with pytest.raises(ValueError, match="consumer 4"):
        assign_partitions(parts, consumer=4, num_consumers=4, seed=0, epoch=0, shuffle=True)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        GeneratedDataset(FakeSource(2), rank=2, world_size=2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        GeneratedDataset(FakeSource(2), rank=0)
    with pytest.raises(ValueError, match="buffer_partitions"):
        GeneratedDataset(FakeSource(2), buffer_partitions=0)


class FakeStream:
    def __init__(self, n: int) -> None:
        self.n, self.closed = n, False

    def __iter__(self) -> Iterator[ExampleDict]:
        for i in range(self.n):
            yield _example(f"s/{i}/0")

    def close(self) -> None:
        self.closed = True


def test_stream_is_iterated_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = FakeStream(5)
    ds = GeneratedDataset(stream)
    assert [ex["id"] for ex in ds] == [f"s/{i}/0" for i in range(5)]
    assert not stream.closed, "the caller owns a stream it passed in"
    with pytest.raises(ValueError, match="partitions only apply"):
        GeneratedDataset(stream, partitions=["x"])
    monkeypatch.setattr("specops.dataset.get_worker_info", lambda: _Worker(0, 2))
    with pytest.raises(RuntimeError, match="pass a factory"):
        list(GeneratedDataset(stream))


def test_stream_factory_is_opened_per_iteration_and_closed() -> None:
    made: list[FakeStream] = []

    def factory() -> FakeStream:
        made.append(FakeStream(3))
        return made[-1]

    ds = GeneratedDataset(factory)
    assert len(list(ds)) == 3 and len(list(ds)) == 3
    assert len(made) == 2 and all(s.closed for s in made)
