"""Training-time test (TTT): the shift convention shared by the draft forward and its targets.

Notation for one document (row index t, TTT step i = 0 .. S-1; x = input_ids,
f = verifier aux features, y = verifier last pre-norm hidden state, l = loss_mask):

* Draft input at step i, index t:
    - token   x[t + 1 + i]   (teacher forcing: the data's next tokens, as EAGLE-3 trains),
    - hidden  fc(f[t]) at step 0, else the draft's own output hidden state of step i-1 at index t,
    - rotary position  position_ids[t] + i.
* Draft logits of step i at index t predict token x[t + 2 + i].
* Target of step i at index t: softmax over the draft vocabulary of the verifier's logits at
  index t + 1 + i, i.e. `lm_head(norm(y[t + 1 + i]))[t2d]` (its prediction of x[t + 2 + i]).
* Valid where l[t + 1 + i] is set, t + 1 + i is inside the row and in the same document as t,
  and t is not padding. (The loss mask marks the position whose next-token distribution is
  trained on, as the reference `speculators` library aligns it.)

Attention at step i for the query at index t (per decoder layer):
* step-0 keys/values at indices s <= t of the same document — the context, built from the
  verifier's features f[s] (what vLLM's draft KV cache holds for accepted tokens);
* the draft's own keys/values of steps 1 .. i at index t only (the "diagonal") — the positions
  t+1 .. t+i the draft itself has just proposed.
This is EAGLE-3's training-time test, and also HASS's harmonized context alignment: deeper steps
see the draft's own features for the recent positions and verifier features for the older ones,
exactly as at inference time. HASS differs only in its loss (top-k distillation, in the trainer);
`step_targets` gives full draft-vocabulary log-probabilities so either loss can use them.

Only trained positions pay for more than step 0's keys and values: `rows_needed` says which
positions each step must compute, and `step_targets` runs the verifier head on trained ones only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from specops.models.batch import PAD_DOCUMENT

if TYPE_CHECKING:
    from specops.models.batch import DraftBatch
    from specops.models.verifier_head import VerifierHead


def shift_left(x: torch.Tensor, n: int, fill: float | int | bool) -> torch.Tensor:
    """x[:, t + n] at index t along dim 1; the last n positions hold `fill`."""
    if n == 0:
        return x
    out = torch.full_like(x, fill)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


def step_tokens(input_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Teacher-forced draft input tokens of TTT step `step`: x[t + 1 + step] (0 past the row end)."""
    return shift_left(input_ids, 1 + step, 0)


def step_valid(batch: DraftBatch, step: int) -> torch.Tensor:
    """bool [B, T]: where step `step`'s prediction at index t has a target inside its document."""
    ahead = 1 + step
    docs = batch.document_ids
    same_doc = shift_left(docs, ahead, PAD_DOCUMENT - 1) == docs
    return same_doc & (docs != PAD_DOCUMENT) & shift_left(batch.loss_mask.bool(), ahead, False)


def context_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T, T]: query t may attend key s when s <= t within the same document.

    Padding positions (PAD_DOCUMENT) form their own run, so no query row is fully masked.
    """
    t = document_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    return causal[None] & (document_ids[:, :, None] == document_ids[:, None, :])


def rows_needed(where: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per TTT step, bool [B, T]: positions whose draft output step i must compute.

    Step i's output at index t feeds step i+1 at t, so a position is needed at step i when any
    step j >= i trains on it: `where[i] | where[i+1] | ...`. Positions outside it (prompts, the
    row tails) still give step 0 its context keys, but skip the rest of the draft.
    """
    needed: list[torch.Tensor] = []
    for mask in reversed(where):
        needed.append(mask if not needed else mask | needed[-1])
    return needed[::-1]


@torch.no_grad()
def step_targets(
    batch: DraftBatch, head: VerifierHead, t2d: torch.Tensor, ttt_steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per TTT step: (target log-probs over the draft vocab [N_i, Vd] fp32, valid mask [B, T]).

    Row n of step i's log-probs belongs to the n-th position (row-major) its valid mask marks;
    `targets[i][0]` aligns with `forward_ttt(..., where=[valid masks])[i]`. Log-probs are
    renormalized over the draft vocabulary. The verifier head runs once per trained position
    (steps share them, shifted), never on prompts or padding.
    """
    if ttt_steps < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
    trained = batch.loss_mask.bool() & (batch.document_ids != PAD_DOCUMENT)  # every step's target index
    logp = torch.log_softmax(head.draft_logits(batch.last_hidden[trained], t2d).float(), dim=-1)
    row_of = trained.flatten().cumsum(0).view_as(trained) - 1  # position -> its row of `logp`
    targets = []
    for i in range(ttt_steps):
        valid = step_valid(batch, i)
        targets.append((logp[shift_left(row_of, 1 + i, 0)[valid]], valid))
    return targets
