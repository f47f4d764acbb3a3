"""The protocols every store implements; engines and trainers see only these."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from specops.example import ExampleDict


@dataclass(frozen=True)
class StoreMeta:
    """What produced a set of examples; a store refuses to mix examples from different producers."""

    verifier: str
    """Verifier name_or_path (plus `@revision` when pinned)."""
    layer_ids: tuple[int, ...]
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    """torch dtype name of hidden_states, e.g. `float32`, `bfloat16`."""
    chat_template_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layer_ids": list(self.layer_ids)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreMeta:
        return cls(**{**data, "layer_ids": tuple(data["layer_ids"])})


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
