"""Capture verifier hidden states with forward hooks, in the ExampleDict slot convention.

Slot k < N is the input of decoder layer k (Transformers' `hidden_states[k]`); slot N is the last
decoder layer's output before the final norm (what vLLM's `extract_hidden_states` emits). Hooks
live only inside the `with` block, so the model stays usable by others (and with a KV cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import torch

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


class StopForward(Exception):
    """Raised by the deepest hook when `stop_after_deepest` is set: later layers are not needed."""


class LayerCapture:
    """`with LayerCapture(layers, ids) as cap: model(...)`, then `cap.stacked()` -> [B, T, L, H]."""

    def __init__(
        self, layers: Sequence[torch.nn.Module], layer_ids: Sequence[int], *, stop_after_deepest: bool = False
    ) -> None:
        self.layers = layers
        self.num_layers = len(layers)
        bad = [k for k in layer_ids if not 0 <= k <= self.num_layers]
        if bad or not layer_ids:
            raise ValueError(f"layer ids {list(layer_ids)} must be non-empty and within 0..{self.num_layers}")
        self.layer_ids = list(layer_ids)
        self.stop_after_deepest = stop_after_deepest
        self.captured: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Self:
        self.captured = {}
        deepest = max(self.layer_ids)
        for k in sorted(set(self.layer_ids)):
            stop = self.stop_after_deepest and k == deepest
            if k < self.num_layers:
                self._handles.append(
                    self.layers[k].register_forward_pre_hook(self._pre_hook(k, stop), with_kwargs=True)
                )
            else:
                self._handles.append(self.layers[k - 1].register_forward_hook(self._post_hook(k, stop)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return exc_type is StopForward

    def _pre_hook(self, slot: int, stop: bool) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.captured[slot] = args[0] if args else kwargs["hidden_states"]
            if stop:
                raise StopForward

        return hook

    def _post_hook(self, slot: int, stop: bool) -> Any:
        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            self.captured[slot] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise StopForward

        return hook

    def stacked(self) -> torch.Tensor:
        """[B, T, L, H] in `layer_ids` order (raises if a layer did not run)."""
        missing = [k for k in self.layer_ids if k not in self.captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not captured (did the forward run inside the block?)")
        return torch.stack([self.captured[k] for k in self.layer_ids], dim=2)
