"""Draft losses and metrics over training-time-test (TTT) steps.

Every step i compares the draft's logits with the verifier's distribution over the draft
vocabulary at the same anchor index t (see `specops.models.ttt` for the alignment):

* eagle3: forward KL(p_verifier || q_draft), summed over the vocabulary;
* hass:   the same KL plus HASS's top-k distillation term, -sum_{v in topk(p)} p(v) log q(v),
  which spends the draft's capacity on the tokens the verifier ranks highest.

Losses are token sums divided by a caller-given denominator per step (the global count of valid
tokens over all ranks, divided by the world size), so data-parallel gradient averaging equals
the gradient of one process seeing every rank's tokens. Metrics come back as sums in one
`[len(METRICS), steps]` tensor so one all-reduce aggregates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

METRICS: tuple[str, ...] = ("loss", "tokens", "full_correct", "chain_tokens", "cond_correct", "cond_tokens")
"""Rows of the metric-sum tensor: loss sum and its token count; tokens where this step and all
earlier ones are right, over tokens valid for all of them; right given all earlier steps right."""

Algorithm = Literal["eagle3", "hass"]


@dataclass(frozen=True)
class LossSpec:
    """How to weigh and shape the loss."""

    algorithm: Algorithm
    step_decay: float
    """Weight of step i is step_decay**i."""
    topk: int = 10
    """HASS: verifier top-k distilled."""
    topk_weight: float = 1.0
    """HASS: weight of the top-k term next to the KL."""


def token_losses(
    draft_logits: torch.Tensor, target_logp: torch.Tensor, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position loss [...] (with grad) and whether the draft's argmax equals the verifier's.

    Both inputs are [..., V] over the draft vocabulary (any leading shape)."""
    draft_logp = torch.log_softmax(draft_logits.float(), dim=-1)
    # KL(p || q) = sum p (log p - log q): one fused kernel; target log-probs must be finite (log_softmax).
    loss = F.kl_div(draft_logp, target_logp, log_target=True, reduction="none").sum(-1)
    if spec.algorithm == "hass":
        k = min(spec.topk, target_logp.shape[-1])
        top_logp, top_idx = target_logp.topk(k, dim=-1)
        loss = loss - spec.topk_weight * (top_logp.exp() * draft_logp.gather(-1, top_idx)).sum(-1)
    correct = draft_logits.argmax(-1) == target_logp.argmax(-1)
    return loss, correct


def step_valid_counts(targets: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """float64 [steps]: valid target positions per step (the loss denominators before reduction)."""
    return torch.stack([valid.sum() for _, valid in targets]).double()


def draft_loss(
    draft_logits: Sequence[torch.Tensor],
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    denominators: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss to back-propagate, metric sums [len(METRICS), steps]).

    Each step's logits and target log-probs are [B, T, V], or [N, V] for just the N positions its
    valid mask marks (as `forward_ttt(where=...)` and `step_targets` give them)."""
    if len(draft_logits) != len(targets):
        raise ValueError(f"{len(draft_logits)} draft steps but {len(targets)} target steps")
    device = draft_logits[0].device
    total = draft_logits[0].new_zeros((), dtype=torch.float32)
    rows: list[torch.Tensor] = []
    chain_ok: torch.Tensor | None = None
    chain_valid: torch.Tensor | None = None
    for i, (logits, (target_logp, valid)) in enumerate(zip(draft_logits, targets, strict=True)):
        valid = valid.to(device)
        # Only valid positions pay for the vocabulary-wide softmax, KL and argmax.
        loss, correct_valid = token_losses(
            _at_valid(logits, valid, "draft logits"),
            _at_valid(target_logp.to(device), valid, "targets"),
            spec,
        )
        correct = torch.zeros_like(valid)
        correct[valid] = correct_valid
        step_sum = loss.sum()
        total = total + (spec.step_decay**i) * step_sum / denominators[i].to(device, torch.float32).clamp(
            min=1e-12
        )
        prev_ok = chain_ok if chain_ok is not None else torch.ones_like(correct)
        chain_valid = valid if chain_valid is None else chain_valid & valid
        chain_ok = prev_ok & correct & valid
        cond = chain_valid & prev_ok
        parts = [
            step_sum.detach(),
            valid.sum(),
            chain_ok.sum(),
            chain_valid.sum(),
            (cond & correct).sum(),
            cond.sum(),
        ]
        rows.append(torch.stack([p.double() for p in parts]))
    return total, torch.stack(rows, dim=1)


def _at_valid(values: torch.Tensor, valid: torch.Tensor, what: str) -> torch.Tensor:
    """[N, V] rows of the valid positions: from full [B, T, V] values, or as given when only
    those rows were computed."""
    if values.shape[:-1] == valid.shape:
        return values[valid]
    if values.dim() == 2 and values.shape[0] == int(valid.sum()):
        return values
    raise ValueError(
        f"{what} {tuple(values.shape)} fit neither the valid mask {tuple(valid.shape)} nor its count"
    )


def summarize(sums: torch.Tensor, step_decay: float) -> dict[str, float]:
    """Readable metrics from summed rows: per-step loss/full_acc/cond_acc and the weighted loss."""
    rows = dict(zip(METRICS, sums.double(), strict=True))
    out: dict[str, float] = {}
    weighted = 0.0
    for i in range(sums.shape[1]):
        loss = float(rows["loss"][i] / rows["tokens"][i].clamp(min=1))
        weighted += step_decay**i * loss
        out[f"loss_{i}"] = loss
        out[f"full_acc_{i}"] = float(rows["full_correct"][i] / rows["chain_tokens"][i].clamp(min=1))
        out[f"cond_acc_{i}"] = float(rows["cond_correct"][i] / rows["cond_tokens"][i].clamp(min=1))
    out["loss"] = weighted
    # Expected tokens accepted per verifier call under greedy chain drafting (1 + sum of full accuracies).
    out["accept_proxy"] = 1.0 + sum(out[f"full_acc_{i}"] for i in range(sums.shape[1]))
    out["tokens"] = float(rows["tokens"][0])
    return out
