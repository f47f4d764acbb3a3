"""Batching: pack variable-length examples into a fixed token budget (or pad them, the baseline).

A packed batch holds `rows = tokens_per_step // row_len` rows of at most `row_len =
min(max_seq_len, tokens_per_step)` tokens. Examples are placed first-fit in arrival order and a
batch is closed when the next example fits no row, so every batch is a contiguous run of the
input stream: the data position after a batch is just a count, which makes resume exact.
Documents never see each other: `document_ids` separates them and `position_ids` restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from specops.example import ExampleDict
from specops.models.batch import PAD_DOCUMENT, DraftBatch

Batching = Literal["packed", "padded"]


@dataclass(frozen=True)
class PackedBatch:
    """A DraftBatch plus the bookkeeping the trainer logs and checkpoints."""

    batch: DraftBatch
    consumed: int
    """Examples taken from the input stream to build this batch (skipped ones included)."""
    num_tokens: int
    """Real (non-padding) tokens in the batch."""


def _usable(ex: ExampleDict, row_len: int) -> int:
    """Tokens of `ex` that go into a row (truncated to `row_len`); 0 = nothing to train on."""
    states = ex["hidden_states"]
    if states.dim() != 3 or states.shape[1] < 2:
        raise ValueError(f"example {ex['id']}: hidden_states must be [S, L>=2, H], got {tuple(states.shape)}")
    length = min(int(ex["token_ids"].shape[0]), row_len)
    # Position t trains on the verifier's prediction at t+1, so a lone token or an
    # all-masked example contributes nothing.
    if length < 2 or not bool(ex["loss_mask"][1:length].any()):
        return 0
    return length


def assemble(rows: Sequence[Sequence[ExampleDict]], row_len: int) -> DraftBatch:
    """Concatenate each row's examples (truncated to `row_len`), padded to the longest row."""
    first = rows[0][0]["hidden_states"]
    aux_slots, hidden, dtype = int(first.shape[1]) - 1, int(first.shape[2]), first.dtype
    lengths = [[min(int(ex["token_ids"].shape[0]), row_len) for ex in row] for row in rows]
    width = max(sum(row) for row in lengths)
    b = len(rows)
    input_ids = torch.zeros(b, width, dtype=torch.long)
    aux = torch.zeros(b, width, aux_slots, hidden, dtype=dtype)
    last = torch.zeros(b, width, hidden, dtype=dtype)
    loss_mask = torch.zeros(b, width, dtype=torch.bool)
    position_ids = torch.zeros(b, width, dtype=torch.long)
    document_ids = torch.full((b, width), PAD_DOCUMENT, dtype=torch.long)
    doc = 0
    for r, (row, row_lengths) in enumerate(zip(rows, lengths, strict=True)):
        start = 0
        for ex, n in zip(row, row_lengths, strict=True):
            states = ex["hidden_states"][:n]
            if tuple(states.shape[1:]) != (aux_slots + 1, hidden):
                raise ValueError(
                    f"example {ex['id']}: hidden_states {tuple(states.shape)} do not match the batch's "
                    f"[S, {aux_slots + 1}, {hidden}]"
                )
            end = start + n
            input_ids[r, start:end] = ex["token_ids"][:n]
            aux[r, start:end] = states[:, :-1]
            last[r, start:end] = states[:, -1]
            loss_mask[r, start:end] = ex["loss_mask"][:n].bool()
            position_ids[r, start:end] = torch.arange(n)
            document_ids[r, start:end] = doc
            doc += 1
            start = end
    return DraftBatch(
        input_ids=input_ids,
        aux_hidden=aux,
        last_hidden=last,
        loss_mask=loss_mask,
        position_ids=position_ids,
        document_ids=document_ids,
    )


def row_shape(tokens_per_step: int, max_seq_len: int) -> tuple[int, int]:
    """(rows, row_len) of a packed batch."""
    row_len = min(max_seq_len, tokens_per_step)
    return tokens_per_step // row_len, row_len


Plan = tuple[list[list[ExampleDict]], int, int]
"""(rows of examples, examples consumed, real tokens) of one batch before its tensors are built."""


def plan_packed(examples: Iterable[ExampleDict], tokens_per_step: int, max_seq_len: int) -> Iterator[Plan]:
    """First-fit in arrival order; a batch closes when the next example fits no row."""
    num_rows, row_len = row_shape(tokens_per_step, max_seq_len)
    rows: list[list[ExampleDict]] = [[] for _ in range(num_rows)]
    free = [row_len] * num_rows
    consumed = tokens = 0
    for ex in examples:
        n = _usable(ex, row_len)
        if n == 0:
            consumed += 1
            continue
        slot = next((r for r in range(num_rows) if free[r] >= n), None)
        if slot is None:
            yield [r for r in rows if r], consumed, tokens
            rows = [[] for _ in range(num_rows)]
            free = [row_len] * num_rows
            consumed = tokens = 0
            slot = 0
        rows[slot].append(ex)
        free[slot] -= n
        consumed += 1
        tokens += n
    if tokens:
        yield [r for r in rows if r], consumed, tokens


def plan_padded(examples: Iterable[ExampleDict], tokens_per_step: int, max_seq_len: int) -> Iterator[Plan]:
    """The naive baseline: `tokens_per_step // max_seq_len` examples per batch, one per row."""
    num_rows, row_len = row_shape(tokens_per_step, max_seq_len)
    rows: list[list[ExampleDict]] = []
    consumed = tokens = 0
    for ex in examples:
        consumed += 1
        n = _usable(ex, row_len)
        if n == 0:
            continue
        rows.append([ex])
        tokens += n
        if len(rows) == num_rows:
            yield rows, consumed, tokens
            rows, consumed, tokens = [], 0, 0
    if rows:
        yield rows, consumed, tokens


def _planner(batching: Batching) -> Callable[[Iterable[ExampleDict], int, int], Iterator[Plan]]:
    if batching not in ("packed", "padded"):
        raise ValueError(f"batching must be 'packed' or 'padded', got {batching!r}")
    return plan_packed if batching == "packed" else plan_padded


def batches(
    examples: Iterable[ExampleDict], batching: Batching, tokens_per_step: int, max_seq_len: int
) -> Iterator[PackedBatch]:
    """Batches of `examples` as `batching` lays them out."""
    row_len = row_shape(tokens_per_step, max_seq_len)[1]
    for rows, consumed, tokens in _planner(batching)(examples, tokens_per_step, max_seq_len):
        yield PackedBatch(assemble(rows, row_len), consumed, tokens)


def count_batches(
    examples: Iterable[ExampleDict], batching: Batching, tokens_per_step: int, max_seq_len: int
) -> int:
    """How many batches `batches` would yield, without building their tensors."""
    return sum(1 for _ in _planner(batching)(examples, tokens_per_step, max_seq_len))
