"""Length buckets and batch planning shared by the engines and the generation driver.

An example is always padded to the bucket of its own length, never to the longest sequence of
whatever batch it happens to land in. Its forward then sees the same tensor shapes (up to the batch
dimension) in every run, which is what makes the output bytes independent of the batch size: CPU
matmuls and attention kernels pick their blocking from the padded length, not from the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

GRANULE = 16
"""Smallest padding step; short sequences round up to a multiple of this."""
STEP_SHIFT = 3
"""Above the granule the step is 2**(floor(log2 n) - STEP_SHIFT): padding stays below 1/8 of n."""


def bucket_length(length: int, cap: int | None = None) -> int:
    """The padded length of a `length`-token sequence: a pure function of `length` (and `cap`).

    `cap` (e.g. the model's maximum positions) limits the padding, never the sequence itself.
    """
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    step = max(GRANULE, 1 << max(0, length.bit_length() - 1 - STEP_SHIFT))
    padded = -(-length // step) * step
    return max(length, min(padded, cap)) if cap is not None else padded


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int, cap: int | None = None
) -> list[tuple[int, list[int]]]:
    """Group indices into `(padded_length, indices)` batches, one bucket per batch, longest first.

    Within a bucket the input order is kept, so the plan is deterministic. A batch holds at most
    `batch_size` sequences and at most `max_tokens` padded tokens (but always at least one sequence).
    """
    buckets: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        buckets.setdefault(bucket_length(length, cap), []).append(index)
    plan: list[tuple[int, list[int]]] = []
    for padded in sorted(buckets, reverse=True):
        members = buckets[padded]
        per_batch = max(1, min(batch_size, max_tokens // padded))
        plan.extend((padded, members[i : i + per_batch]) for i in range(0, len(members), per_batch))
    return plan


def in_length_groups(
    prompts: Sequence[Sequence[int]], size: int, run: Callable[[list[Sequence[int]]], list[T]]
) -> list[T]:
    """`run` over groups of `size` prompts of similar length (little padding), results in prompt order."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, T] = {}
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        results.update(zip(chosen, run([prompts[i] for i in chosen]), strict=True))
    return [results[i] for i in range(len(prompts))]


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    window: list[T] = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window
