"""Packing: documents share rows without seeing each other, batches are contiguous runs of the input."""

from __future__ import annotations

import pytest
import torch

from specops.example import ExampleDict
from specops.models.batch import PAD_DOCUMENT
from specops.train.packing import batches, count_batches, row_shape

H = 4


def example(i: int, length: int, *, masked: bool = False, slots: int = 3) -> ExampleDict:
    ids = torch.arange(length, dtype=torch.int32) + 100 * i
    return {
        "id": f"p/{i}/0",
        "token_ids": ids,
        "loss_mask": torch.zeros(length, dtype=torch.uint8)
        if masked
        else torch.ones(length, dtype=torch.uint8),
        # hidden value encodes (example, position, slot) so misplaced copies are visible
        "hidden_states": (
            1000.0 * i + torch.arange(length)[:, None, None] + 0.1 * torch.arange(slots)[None, :, None]
        )
        .expand(length, slots, H)
        .clone(),
    }


def test_row_shape_splits_the_budget() -> None:
    assert row_shape(128, 64) == (2, 64)
    assert row_shape(100, 2048) == (1, 100)


def test_packed_rows_keep_documents_apart_and_in_order() -> None:
    examples = [example(i, n) for i, n in enumerate([10, 20, 30, 15, 5])]
    out = list(batches(examples, "packed", tokens_per_step=64, max_seq_len=32))
    assert sum(b.consumed for b in out) == 5
    assert sum(b.num_tokens for b in out) == 80
    first = out[0].batch
    # first-fit into two rows of 32: [10, 20] then [30]; 15 fits nowhere -> next batch
    assert out[0].consumed == 3 and first.shape == (2, 30)
    docs = first.document_ids
    assert docs[0, :10].eq(0).all() and docs[0, 10:30].eq(1).all()
    assert docs[1, :30].eq(2).all()
    assert first.position_ids[0, 10:30].tolist() == list(range(20))
    assert torch.equal(first.input_ids[0, 10:30], torch.arange(20) + 100)
    # aux slots 0..1 and the last slot (final pre-norm) land in the right tensors
    assert first.aux_hidden[0, 12, 1, 0].item() == pytest.approx(1000.0 + 2 + 0.1)
    assert first.last_hidden[1, 3, 0].item() == pytest.approx(2000.0 + 3 + 0.2)
    second = out[1].batch
    # first-fit: 15 and 5 share the first row, no empty row is emitted
    assert second.document_ids.tolist() == [[0] * 15 + [1] * 5]
    assert second.position_ids[0, 15:].tolist() == list(range(5))


def test_long_examples_are_truncated_and_empty_ones_counted_not_packed() -> None:
    examples = [example(0, 50), example(1, 8, masked=True), example(2, 1), example(3, 6)]
    out = list(batches(examples, "packed", tokens_per_step=32, max_seq_len=32))
    assert [b.consumed for b in out] == [3, 1]
    assert out[0].batch.shape == (1, 32) and out[0].num_tokens == 32
    assert out[1].batch.document_ids.tolist() == [[0] * 6]


def test_padded_baseline_puts_one_example_per_row() -> None:
    examples = [example(i, n) for i, n in enumerate([10, 20, 30])]
    out = list(batches(examples, "padded", tokens_per_step=64, max_seq_len=32))
    assert [b.consumed for b in out] == [2, 1]
    assert out[0].batch.shape == (2, 20)
    assert out[0].batch.document_ids[0, 10:].eq(PAD_DOCUMENT).all()
    assert not out[0].batch.loss_mask[0, 10:].any()


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_count_batches_matches_the_batches(batching: str) -> None:
    examples = [example(i, 5 + (7 * i) % 23) for i in range(30)]
    built = list(batches(examples, batching, 64, 32))  # type: ignore[arg-type]
    assert count_batches(examples, batching, 64, 32) == len(built)  # type: ignore[arg-type]


def test_mismatched_hidden_states_name_the_example() -> None:
    with pytest.raises(ValueError, match="p/1/0"):
        list(batches([example(0, 5), example(1, 5, slots=2)], "packed", 64, 32))
    with pytest.raises(ValueError, match="p/0/0"):
        list(batches([example(0, 5, slots=1)], "packed", 64, 32))
    with pytest.raises(ValueError, match="batching"):
        list(batches([example(0, 5)], "sorted", 64, 32))  # type: ignore[arg-type]
