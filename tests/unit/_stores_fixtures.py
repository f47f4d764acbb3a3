"""Small deterministic examples shared by the store, dataset and layout tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from specops.example import ExampleDict
from specops.stores.base import StoreMeta

META = StoreMeta(
    verifier="tiny-verifier", layer_ids=(1, 2), num_layers=2, hidden_size=8, vocab_size=64, dtype="float32"
)


def make_example(
    i: int, meta: StoreMeta = META, *, seq: int | None = None, extras: bool = False
) -> ExampleDict:
    """Example `d/<i>/0`: content depends only on i, length 3..9 unless `seq` is given."""
    length = seq if seq is not None else 3 + i % 7
    g = torch.Generator().manual_seed(1000 + i)
    ex: ExampleDict = {
        "id": f"d/{i}/0",
        "token_ids": torch.randint(0, meta.vocab_size, (length,), generator=g, dtype=torch.int32),
        "loss_mask": (torch.rand(length, generator=g) > 0.4).to(torch.uint8),
        "hidden_states": torch.randn(length, len(meta.layer_ids), meta.hidden_size, generator=g).to(
            getattr(torch, meta.dtype)
        ),
    }
    if extras:
        ex["logits"] = torch.randn(length, meta.vocab_size, generator=g)
        ex["output_tokens"] = torch.randint(0, meta.vocab_size, (length,), generator=g, dtype=torch.int32)
    return ex


def expected_counts(examples: Iterable[ExampleDict]) -> dict[int, int]:
    """Loss-masked token frequencies computed the obvious way."""
    counts: Counter[int] = Counter()
    for ex in examples:
        counts.update(ex["token_ids"][ex["loss_mask"].bool()].tolist())
    return dict(counts)


def assert_same_example(got: ExampleDict, want: ExampleDict) -> None:
    assert got["id"] == want["id"]
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        if key != "id":
            a, b = got[key], want[key]  # type: ignore[literal-required]
            assert a.dtype == b.dtype and torch.equal(a, b), f"{want['id']}: {key} differs"
