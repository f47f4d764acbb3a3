"""Draft vocabulary selection and the d2t / t2d maps."""

from __future__ import annotations

import pytest
import torch

from specops.models.vocab import build_vocab_mapping, check_vocab_mapping, draft_ids, select_draft_tokens


def test_top_tokens_by_frequency_then_id_sorted_ascending() -> None:
    counts = {7: 5, 3: 9, 12: 5, 1: 1, 9: 5}
    # 3 (9), then the tie at 5 broken by id: 7, 9, 12 -> top 3 = {3, 7, 9}
    assert select_draft_tokens(counts, 16, 3) == [3, 7, 9]


def test_d2t_offsets_and_t2d_mask() -> None:
    t2d, d2t = build_vocab_mapping({5: 10, 2: 4, 9: 7}, 12, 3)
    assert t2d.dtype == torch.bool and t2d.shape == (12,)
    assert d2t.dtype == torch.int64 and d2t.tolist() == [2 - 0, 5 - 1, 9 - 2]
    assert draft_ids(t2d).tolist() == [2, 5, 9]
    assert (torch.arange(3) + d2t).tolist() == [2, 5, 9]
    check_vocab_mapping(t2d, d2t)


def test_unseen_tokens_fill_by_id_and_zero_counts_are_unseen() -> None:
    assert select_draft_tokens({6: 3, 0: 0}, 8, 4) == [0, 1, 2, 6]


def test_a_draft_vocab_of_the_whole_verifier_vocab_is_the_identity() -> None:
    t2d, d2t = build_vocab_mapping({1: 1}, 5, 5)
    assert t2d.all() and d2t.tolist() == [0] * 5


def test_a_draft_vocab_larger_than_the_verifier_vocab_is_refused() -> None:
    """It used to be clipped silently: 32000 of a 578-token verifier exported a 578-token draft."""
    with pytest.raises(ValueError, match=r"draft_vocab_size 32000 must be in 1\.\.5 "):
        build_vocab_mapping({1: 1}, 5, 32000)


@pytest.mark.parametrize(
    ("counts", "vocab", "size", "message"),
    [
        ({10: 1}, 8, 4, "outside the verifier vocabulary"),
        ({1: -2}, 8, 4, "negative count"),
        ({1: 1}, 8, 0, "draft_vocab_size"),
        ({}, 0, 4, "vocab_size"),
    ],
)
def test_bad_counts_are_rejected(counts: dict[int, int], vocab: int, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_draft_tokens(counts, vocab, size)


def test_mismatched_maps_are_rejected() -> None:
    t2d, d2t = build_vocab_mapping({1: 3, 4: 2}, 6, 2)
    with pytest.raises(ValueError, match="disagree"):
        check_vocab_mapping(t2d, d2t + 1)
    with pytest.raises(ValueError, match="int64"):
        check_vocab_mapping(t2d, d2t.int())
    with pytest.raises(ValueError, match="bool"):
        check_vocab_mapping(t2d.long(), d2t)
