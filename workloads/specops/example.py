"""ExampleDict: the one record that engines produce and stores, streams and the dataset carry."""

from __future__ import annotations

from typing import TYPE_CHECKING, NotRequired, TypedDict

if TYPE_CHECKING:
    from torch import Tensor


class ExampleDict(TypedDict):
    """One training example.

    `hidden_states[:, j]` is the captured slot for `layer_ids[j]`: slot k is the input of decoder
    layer k; slot `num_layers` is the final layer output before the final norm.
    """

    id: str
    """Stable id `<dataset>/<row>/<turn>`; the unit of resume, de-duplication and acks."""
    token_ids: Tensor
    """int32 [S]."""
    loss_mask: Tensor
    """uint8 [S]; 1 where the token is trained on (assistant tokens)."""
    hidden_states: Tensor
    """[S, L, H] in the verifier dtype."""
    logits: NotRequired[Tensor]
    """Optional [S, V] verifier logits."""
    output_tokens: NotRequired[Tensor]
    """Optional int32 [S] verifier greedy next tokens."""


TENSOR_FIELDS: tuple[str, ...] = ("token_ids", "loss_mask", "hidden_states", "logits", "output_tokens")
"""Tensor-valued keys of ExampleDict in their canonical order."""
