"""Losses: forward KL against the verifier, HASS top-k term, per-step decay and chain accuracies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specops.train.losses import METRICS, LossSpec, draft_loss, step_valid_counts, summarize, token_losses

EAGLE = LossSpec("eagle3", step_decay=1.0)


def test_kl_matches_torch_and_is_zero_for_a_perfect_draft() -> None:
    g = torch.Generator().manual_seed(0)
    draft = torch.randn(2, 5, 11, generator=g)
    target = torch.log_softmax(torch.randn(2, 5, 11, generator=g) * 3, dim=-1)
    loss, _ = token_losses(draft, target, EAGLE)
    reference = F.kl_div(torch.log_softmax(draft, -1), target, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(loss, reference)
    perfect, correct = token_losses(target.clone(), target, EAGLE)
    torch.testing.assert_close(perfect, torch.zeros(2, 5), atol=1e-5, rtol=0)
    assert correct.all()


def test_kl_of_a_near_one_hot_target_is_the_cross_entropy() -> None:
    target = torch.log_softmax(torch.tensor([[[60.0, 0.0, 0.0]]]), -1)  # p = (1, ~1e-26, ~1e-26)
    loss, _ = token_losses(torch.tensor([[[2.0, 0.0, 0.0]]]), target, EAGLE)
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), -1)[0]
    torch.testing.assert_close(loss[0, 0], expected)


def test_hass_adds_the_topk_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    draft = torch.randn(1, 3, 9, generator=g)
    target = torch.log_softmax(torch.randn(1, 3, 9, generator=g) * 2, dim=-1)
    kl, _ = token_losses(draft, target, EAGLE)
    hass, _ = token_losses(draft, target, LossSpec("hass", 1.0, topk=2, topk_weight=0.5))
    p = target.exp()
    top_p, top_i = p.topk(2, dim=-1)
    topk_ce = -(top_p * torch.log_softmax(draft, -1).gather(-1, top_i)).sum(-1)
    torch.testing.assert_close(hass, kl + 0.5 * topk_ce)


def _one_hot_logp(ids: list[int], vocab: int = 4) -> torch.Tensor:
    return torch.log(F.one_hot(torch.tensor([ids]), vocab).float().clamp(min=1e-9))


def test_chain_accuracy_and_decay_weighting() -> None:
    # verifier argmax per position for two steps; the draft is right at step 0 on t=0,1,2 and at step 1 on t=0,2,3
    targets = [(_one_hot_logp([0, 1, 2, 3]), torch.ones(1, 4, dtype=torch.bool)) for _ in range(2)]
    draft = [_one_hot_logp([0, 1, 2, 0]) * 10, _one_hot_logp([0, 0, 2, 3]) * 10]
    loss, sums = draft_loss(draft, targets, torch.tensor([4.0, 4.0]), LossSpec("eagle3", step_decay=0.5))
    rows = dict(zip(METRICS, sums, strict=True))
    assert rows["tokens"].tolist() == [4, 4]
    assert rows["full_correct"].tolist() == [3, 2]  # step 1: only t=0 and t=2 have both steps right
    assert rows["cond_correct"].tolist() == [3, 2] and rows["cond_tokens"].tolist() == [4, 3]
    step_losses = rows["loss"] / rows["tokens"]
    torch.testing.assert_close(loss.double(), step_losses[0] + 0.5 * step_losses[1])
    metrics = summarize(sums, step_decay=0.5)
    assert metrics["full_acc_1"] == pytest.approx(0.5) and metrics["cond_acc_1"] == pytest.approx(2 / 3)
    assert metrics["accept_proxy"] == pytest.approx(1 + 0.75 + 0.5)


def test_invalid_positions_add_nothing_and_denominators_scale() -> None:
    g = torch.Generator().manual_seed(2)
    draft = [torch.randn(1, 6, 5, generator=g, requires_grad=True)]
    valid = torch.tensor([[True, True, False, True, False, False]])
    target = torch.log_softmax(torch.randn(1, 6, 5, generator=g), -1)
    loss, sums = draft_loss(draft, [(target, valid)], step_valid_counts([(target, valid)]), EAGLE)
    per_token, _ = token_losses(draft[0], target, EAGLE)
    torch.testing.assert_close(loss, per_token[valid].mean())
    half, _ = draft_loss(draft, [(target, valid)], torch.tensor([6.0]), EAGLE)
    torch.testing.assert_close(half, per_token[valid].sum() / 6)
    loss.backward()
    assert draft[0].grad is not None and draft[0].grad[0, 2].abs().sum() == 0
    assert sums[METRICS.index("tokens"), 0] == 3


def test_step_count_mismatch_is_an_error() -> None:
    t = (torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 draft steps but 1 target"):
        draft_loss([torch.zeros(1, 2, 3)] * 2, [t], torch.ones(1), EAGLE)
