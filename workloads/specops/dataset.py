"""GeneratedDataset: the trainer's view of generated examples, safe across DataLoader workers and ranks.

For a partitioned `DataSource` (disk shards, upstream hs files) every (rank, worker) consumer
derives the same seeded partition order for the epoch and takes every n-th partition, so consumers
never overlap and together read every partition exactly once. Examples are shuffled within a
window of a few partitions, which bounds memory to those partitions' buffers.
A `StreamSource` is iterated as is: the queue or broker already hands each consumer disjoint items.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from specops.example import ExampleDict
from specops.stores.base import DataSource, StreamSource

StreamFactory = Callable[[], StreamSource]


def assign_partitions(
    partitions: Sequence[str], *, consumer: int, num_consumers: int, seed: int, epoch: int, shuffle: bool
) -> list[str]:
    """Partitions consumer `consumer` of `num_consumers` reads this epoch (round-robin over one
    shared order, so the counts differ by at most one)."""
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} must be in [0, {num_consumers})")
    order = list(partitions)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[consumer::num_consumers]


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GeneratedDataset(IterableDataset[ExampleDict]):
    """Iterates ExampleDicts (torch tensors) from a DataSource, a StreamSource or a stream factory.

    Pass a factory (called inside each DataLoader worker) for streams read by several workers:
    sockets and queues do not survive the fork into workers.
    """

    def __init__(
        self,
        source: DataSource | StreamSource | StreamFactory,
        *,
        partitions: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_partitions: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """`partitions` restricts a DataSource to a subset;
        `rank`/`world_size` default to torch.distributed's when it is initialized."""
        if buffer_partitions < 1:
            raise ValueError("buffer_partitions must be >= 1")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.source = source
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_partitions = buffer_partitions
        self.epoch = 0
        self._rank, self._world_size = rank, world_size
        self._partitions: list[str] | None = None
        if isinstance(source, DataSource):
            self._partitions = list(source.partitions() if partitions is None else partitions)
        elif partitions is not None:
            raise ValueError("partitions only apply to a partitioned DataSource")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call on every rank before iterating)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[ExampleDict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self._partitions is None:
            yield from self._iter_stream(num_workers)
            return
        assert isinstance(self.source, DataSource)
        rank, world = (self._rank, self._world_size) if self._rank is not None else _dist_rank_world()
        assert world is not None
        consumer = rank * num_workers + worker
        mine = assign_partitions(
            self._partitions,
            consumer=consumer,
            num_consumers=world * num_workers,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
        )
        rng = random.Random(f"{self.seed}:{self.epoch}:{consumer}")
        for start in range(0, len(mine), self.buffer_partitions):
            window = [ex for p in mine[start : start + self.buffer_partitions] for ex in self.source.read(p)]
            if self.shuffle:
                rng.shuffle(window)
            yield from window

    def _iter_stream(self, num_workers: int) -> Iterator[ExampleDict]:
        if isinstance(self.source, StreamSource):
            if num_workers > 1:
                raise RuntimeError(
                    "a StreamSource instance cannot be shared by DataLoader workers; pass a factory"
                )
            yield from self.source
            return
        assert callable(self.source)
        stream = self.source()
        try:
            yield from stream
        finally:
            stream.close()
