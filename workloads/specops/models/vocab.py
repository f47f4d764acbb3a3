"""Draft vocabulary: the most frequent trained tokens, and the d2t / t2d maps EAGLE-3 defines.

The draft predicts over `draft_vocab_size` ids: the top tokens by (-frequency, id) among the
loss-masked tokens of the training data, sorted ascending. `d2t[i] = target_id(i) - i` (int64
offsets, so a draft id maps back with `i + d2t[i]`), `t2d[v]` is true when target id v is in the
draft vocabulary (bool [V]). When fewer distinct tokens were seen, unseen ids fill by id order.
A draft vocabulary larger than the verifier's is refused: clipping it would export a draft whose
size differs from the configured one without saying so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def select_draft_tokens(counts: Mapping[int, int], vocab_size: int, draft_vocab_size: int) -> list[int]:
    """The draft vocabulary as ascending target ids."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ValueError(
            f"draft_vocab_size {draft_vocab_size} must be in 1..{vocab_size} (the verifier vocabulary)"
        )
    size = draft_vocab_size
    for token, count in counts.items():
        if not 0 <= int(token) < vocab_size:
            raise ValueError(f"token counts: id {token} outside the verifier vocabulary 0..{vocab_size - 1}")
        if int(count) < 0:
            raise ValueError(f"token counts: id {token} has a negative count {count}")
    seen = sorted((token for token, count in counts.items() if count > 0), key=lambda t: (-counts[t], t))
    chosen = seen[:size]
    if len(chosen) < size:
        taken = set(chosen)
        fill = (t for t in range(vocab_size) if t not in taken)
        chosen.extend(next(fill) for _ in range(size - len(chosen)))
    return sorted(chosen)


def build_vocab_mapping(
    counts: Mapping[int, int], vocab_size: int, draft_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2d bool [V], d2t int64 [Vd]) from token counts over loss-masked tokens."""
    ids = torch.tensor(select_draft_tokens(counts, vocab_size, draft_vocab_size), dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    d2t = ids - torch.arange(ids.numel(), dtype=torch.long)
    return t2d, d2t


def draft_ids(t2d: torch.Tensor) -> torch.Tensor:
    """Ascending target ids of the draft vocabulary (inverse view of t2d)."""
    return torch.nonzero(t2d, as_tuple=False).flatten()


def check_vocab_mapping(t2d: torch.Tensor, d2t: torch.Tensor) -> None:
    """Raise ValueError unless d2t and t2d describe the same ascending draft vocabulary."""
    if t2d.dtype != torch.bool or t2d.dim() != 1:
        raise ValueError(f"t2d must be a bool vector, got {t2d.dtype} {tuple(t2d.shape)}")
    if d2t.dtype != torch.long or d2t.dim() != 1:
        raise ValueError(f"d2t must be an int64 vector, got {d2t.dtype} {tuple(d2t.shape)}")
    targets = d2t + torch.arange(d2t.numel(), dtype=torch.long, device=d2t.device)
    if not torch.equal(targets.cpu(), draft_ids(t2d).cpu()):
        raise ValueError("d2t and t2d disagree: draft id i must map to the i-th target id marked in t2d")
