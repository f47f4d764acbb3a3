"""Length buckets and batch plans: deterministic, bounded padding, every index exactly once."""

from __future__ import annotations

import random

import pytest

from specops.engines.batching import bucket_length, plan_batches


def test_buckets_are_monotone_and_pad_less_than_an_eighth() -> None:
    previous = 0
    for n in range(1, 5000):
        padded = bucket_length(n)
        assert padded >= n and padded >= previous
        assert padded % 16 == 0
        if n >= 128:
            assert (padded - n) / n < 1 / 8, n
        previous = padded
    assert [bucket_length(n) for n in (1, 16, 17, 100, 129, 2048, 2049)] == [16, 16, 32, 112, 144, 2048, 2304]


def test_cap_limits_padding_not_the_sequence() -> None:
    assert bucket_length(2049, cap=2048) == 2049
    assert bucket_length(2000, cap=2010) == 2010
    assert bucket_length(3000, cap=2048) == 3000


def test_bad_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        bucket_length(0)


def test_plan_covers_each_index_once_within_limits() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 2048) for _ in range(300)]
    plan = plan_batches(lengths, batch_size=8, max_tokens=4096)
    seen = [i for _, indices in plan for i in indices]
    assert sorted(seen) == list(range(len(lengths)))
    for padded, indices in plan:
        assert all(bucket_length(lengths[i]) == padded for i in indices)
        assert 1 <= len(indices) <= 8
        assert len(indices) == 1 or len(indices) * padded <= 4096
    assert [p for p, _ in plan] == sorted((p for p, _ in plan), reverse=True), "longest first"
    assert plan == plan_batches(lengths, batch_size=8, max_tokens=4096), "deterministic"


def test_a_sequence_longer_than_the_token_budget_still_gets_a_batch() -> None:
    assert plan_batches([5000, 10], batch_size=4, max_tokens=1024) == [(5120, [0]), (16, [1])]
