"""The protocols every store implements; engines and trainers see only these."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from specops.example import ExampleDict


@runtime_checkable
class DataSink(Protocol):
    """Receives generated examples. `write` returns once the examples are durable or handed off."""

    def done_ids(self) -> set[str]:
        """Ids already committed by earlier runs (resume skips them)."""
        ...

    def write(self, examples: Sequence[ExampleDict]) -> None: ...

    def close(self) -> None:
        """Flush and commit what is buffered; the sink is unusable afterwards."""
        ...


@runtime_checkable
class DataSource(Protocol):
    """Partitioned, re-readable examples (disk). Partitions are the unit of shuffling and sharding."""

    def partitions(self) -> Sequence[str]:
        """Stable partition keys, in a deterministic order."""
        ...

    def read(self, partition: str) -> Iterator[ExampleDict]: ...


@runtime_checkable
class StreamSource(Protocol):
    """A live stream (queue, broker): each consumer receives a disjoint subset, each example once."""

    def __iter__(self) -> Iterator[ExampleDict]: ...

    def close(self) -> None: ...
