"""The InferencePipeline protocol: the only thing the generation driver knows about engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Self

from specops.config import ConfigError, DataGenConfig
from specops.data.records import TokenizedExample
from specops.example import ExampleDict


def default_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's default capture: three auxiliary layers plus the final (pre-norm) output."""
    return [2, num_layers // 2, num_layers - 3, num_layers]


def resolve_layer_ids(requested: list[int] | None, num_layers: int) -> list[int]:
    """Validate requested layer ids against the verifier depth; ids are 0..num_layers inclusive."""
    layer_ids = list(requested) if requested else default_layer_ids(num_layers)
    bad = [k for k in layer_ids if not 0 <= k <= num_layers]
    if bad:
        raise ConfigError(
            f"states.hidden_states.layers: {bad} out of range for a verifier with {num_layers} layers "
            f"(allowed 0..{num_layers}; {num_layers} = final output before the norm)"
        )
    return layer_ids


class InferencePipeline(Protocol):
    """Runs the verifier over token ids and returns one ExampleDict per input, in input order.

    Output bytes for an example must not depend on the batch it was in.
    """

    layer_ids: list[int]
    num_layers: int
    hidden_size: int

    @classmethod
    def from_config(cls, config: DataGenConfig) -> Self: ...

    def forward(self, batch: Sequence[TokenizedExample]) -> list[ExampleDict]: ...
