"""DraftBatch: the tensors one draft training (or evaluation) forward consumes.

Rows may pack several documents: `document_ids` says which, and attention, shifts and targets
never cross a document boundary (see `specops.models.ttt` for the shift convention).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from specops.example import ExampleDict

PAD_DOCUMENT = -1
"""`document_ids` value of padding positions."""


@dataclass
class DraftBatch:
    """A [B, T] batch of (possibly packed) verifier outputs."""

    input_ids: torch.Tensor
    """int64 [B, T] token ids."""
    aux_hidden: torch.Tensor
    """[B, T, A, H] auxiliary verifier hidden states (A = 3 for EAGLE-3), verifier dtype."""
    last_hidden: torch.Tensor
    """[B, T, H] verifier final-layer output BEFORE the final norm (targets come from it)."""
    loss_mask: torch.Tensor
    """[B, T] bool/uint8; 1 where the verifier's next-token distribution is trained on."""
    position_ids: torch.Tensor
    """int64 [B, T]; restart at 0 for every packed document."""
    document_ids: torch.Tensor
    """int64 [B, T]; attention is causal within one document; PAD_DOCUMENT (-1) = padding."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T)."""
        b, t = self.input_ids.shape
        return int(b), int(t)

    def validate(self) -> None:
        """Raise ValueError naming the field whose shape or dtype is wrong."""
        if self.input_ids.dim() != 2:
            raise ValueError(f"DraftBatch.input_ids must be [B, T], got {tuple(self.input_ids.shape)}")
        b, t = self.input_ids.shape
        for name in ("loss_mask", "position_ids", "document_ids"):
            value = getattr(self, name)
            if tuple(value.shape) != (b, t):
                raise ValueError(f"DraftBatch.{name} must be [{b}, {t}], got {tuple(value.shape)}")
        if self.aux_hidden.dim() != 4 or tuple(self.aux_hidden.shape[:2]) != (b, t):
            raise ValueError(
                f"DraftBatch.aux_hidden must be [{b}, {t}, A, H], got {tuple(self.aux_hidden.shape)}"
            )
        hidden = self.aux_hidden.shape[-1]
        if tuple(self.last_hidden.shape) != (b, t, hidden):
            raise ValueError(
                f"DraftBatch.last_hidden must be [{b}, {t}, {hidden}], got {tuple(self.last_hidden.shape)}"
            )
        for name in ("input_ids", "position_ids", "document_ids"):
            if getattr(self, name).is_floating_point():
                raise ValueError(f"DraftBatch.{name} must be an integer tensor")

    def to(self, device: torch.device | str) -> DraftBatch:
        """The same batch on `device` (non-blocking copies)."""
        return DraftBatch(
            **{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)}
        )

    @classmethod
    def from_example(cls, example: ExampleDict) -> DraftBatch:
        """One unpacked document (B = 1): the last hidden slot is the final pre-norm output, the rest aux."""
        states = example["hidden_states"]
        if states.dim() != 3 or states.shape[1] < 2:
            raise ValueError(
                f"example {example['id']}: hidden_states must be [S, L>=2, H], got {tuple(states.shape)}"
            )
        seq = int(states.shape[0])
        return cls(
            input_ids=example["token_ids"].long()[None],
            aux_hidden=states[None, :, :-1],
            last_hidden=states[None, :, -1],
            loss_mask=example["loss_mask"].bool()[None],
            position_ids=torch.arange(seq, dtype=torch.long)[None],
            document_ids=torch.zeros(1, seq, dtype=torch.long),
        )
