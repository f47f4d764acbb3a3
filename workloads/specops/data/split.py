"""The held-out split: which conversations training never sees, decided in one place.

Trainer validation, `specops evaluate`, `specops run --local`, the operator's evaluation Job and
`bench/quality.py` all ask `HeldOutSplit.held_out(example_id)`, so an evaluation prompt is never a
training example. The unit is the conversation, not the example: an example id is
`<dataset>/<row>/<turn>` and every turn of one row shares the conversation id `<dataset>/<row>`
(a conversation split by turns would put its own earlier answers into training). Membership is a
hash of (seed, conversation id) under `fraction`: stable across reruns, ranks, partitions and
shard layouts, and needing nothing but the id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


def conversation_id(example_id: str) -> str:
    """`<dataset>/<row>` of `<dataset>/<row>/<turn>`; an id of another shape is its own conversation."""
    head, sep, turn = example_id.rpartition("/")
    return head if sep and turn.isdigit() and "/" in head else example_id


@dataclass(frozen=True)
class HeldOutSplit:
    """A seeded `fraction` of conversations held out from training (for validation and evaluation)."""

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.fraction}")

    def held_out(self, example_id: str) -> bool:
        """Whether the conversation of `example_id` is held out (never trained on)."""
        if self.fraction <= 0.0:
            return False
        key = f"{self.seed}:{conversation_id(example_id)}".encode()
        digest = hashlib.sha256(key).digest()
        return int.from_bytes(digest[:8], "big") / float(1 << 64) < self.fraction

    def trained(self, example_id: str) -> bool:
        """Whether training may use `example_id` (its conversation is not held out)."""
        return not self.held_out(example_id)

    def to_json(self) -> dict[str, Any]:
        """How the split was made, for reports."""
        return {"by": "conversation", "fraction": self.fraction, "seed": self.seed}
