"""A DiskStore of multi-turn conversations whose prompts name their conversation, for the
held-out split tests of every entry point (trainer, evaluate, run --local, operator, bench)."""

from __future__ import annotations

from pathlib import Path

import torch

from specops.data.split import conversation_id
from specops.example import ExampleDict
from specops.stores.base import StoreMeta
from specops.stores.disk import DiskStore
from specops.train.data import TrainData
from specops.train.distributed import DistEnv

META = StoreMeta(
    verifier="v", layer_ids=(1, 2, 3, 4), num_layers=4, hidden_size=8, vocab_size=96, dtype="float32"
)
ROWS, TURNS = 60, 2


def conversation_examples(rows: int = ROWS, turns: int = TURNS) -> list[ExampleDict]:
    """Example `chat/<row>/<turn>`: prompt `[row + 1, turn + 1, 7]`, then three trained tokens."""
    return [
        {
            "id": f"chat/{row}/{turn}",
            "token_ids": torch.tensor([row + 1, turn + 1, 7, 8, 9, 10], dtype=torch.int32),
            "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.uint8),
            "hidden_states": torch.zeros(6, 4, 8),
        }
        for row in range(rows)
        for turn in range(turns)
    ]


def conversation_store(path: Path, shard_size: int = 1024) -> Path:
    """The examples in one DiskStore (one shard by default, as in the demo)."""
    with DiskStore(path, meta=META, allowed_roots=[path.parent], shard_size=shard_size) as store:
        store.write(conversation_examples())
        store.finalize()
    return path


def prompt_conversation(prompt: list[int]) -> str:
    """The conversation a prompt of `conversation_examples` came from."""
    return f"chat/{prompt[0] - 1}"


def trained_conversations(store: Path, fraction: float, seed: int) -> set[str]:
    """Conversations the trainer's training examples come from (every epoch reads the same set)."""
    data = TrainData(
        DiskStore.open(store, [store.parent]),
        DistEnv(),
        validation_fraction=fraction,
        seed=seed,
        shuffle=False,
    )
    return {conversation_id(ex["id"]) for ex in data.epoch(0)}
