"""The verifier's frozen final norm + lm_head: turns stored pre-norm last hidden states into targets.

Only these two tensors are read from the verifier's safetensors (tied embeddings reuse the input
embedding matrix), so building training targets never loads the whole verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specops.models.safetensors_io import read_json, read_tensors, weight_locations

_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
"""Where text decoders keep `norm`/`embed_tokens` (plain causal LMs first, then multimodal wrappers)."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: normalize in fp32, scale in the weight's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(weight.dtype)


class VerifierHead(nn.Module):
    """Frozen `lm_head(norm(h))` of the verifier; its tensors are buffers, never trained."""

    norm_weight: torch.Tensor
    weight: torch.Tensor

    def __init__(self, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != norm_weight.shape[0]:
            raise ValueError(
                f"lm_head {tuple(lm_head_weight.shape)} does not match the norm size {tuple(norm_weight.shape)}"
            )
        self.eps = float(eps)
        self.register_buffer("norm_weight", norm_weight.detach().clone(), persistent=False)
        self.register_buffer("weight", lm_head_weight.detach().clone(), persistent=False)
        self._draft_key: torch.Tensor | None = None
        self._draft_weight: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> VerifierHead:
        """Read the final norm and lm_head (or the tied input embedding) of a safetensors verifier."""
        config = read_json(name_or_path, "config.json")
        nested = config.get("text_config")
        text: dict[str, Any] = nested if isinstance(nested, dict) else config
        model_type = str(text.get("model_type", config.get("model_type", "")))
        if model_type.startswith("gemma"):
            raise ValueError(
                f"{name_or_path}: {model_type} norms (1 + weight) are not supported as a verifier head"
            )
        eps = text.get("rms_norm_eps", text.get("layer_norm_epsilon", 1e-6))
        names = verifier_tensor_names(name_or_path)
        tensors = read_tensors(name_or_path, sorted({names.norm, names.lm_head}))
        head = cls(tensors[names.norm], tensors[names.lm_head], float(eps))
        return head.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else head

    def normed(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The verifier's final norm applied to pre-norm hidden states."""
        return rms_norm(last_hidden.to(self.norm_weight.dtype), self.norm_weight, self.eps)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """[..., V] verifier logits from [..., H] pre-norm last hidden states."""
        return F.linear(self.normed(last_hidden), self.weight)

    def draft_logits(self, last_hidden: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
        """[..., Vd] verifier logits of the draft vocabulary only (rows where `t2d` is true, in id order)."""
        return F.linear(self.normed(last_hidden), self._rows(t2d))

    def _rows(self, t2d: torch.Tensor) -> torch.Tensor:
        """The draft-vocabulary rows of the lm_head, cached while `t2d` stays the same."""
        if t2d.dtype != torch.bool or t2d.shape != (self.vocab_size,):
            raise ValueError(f"t2d must be bool [{self.vocab_size}], got {t2d.dtype} {tuple(t2d.shape)}")
        key = t2d.to(self.weight.device)
        cached_key, cached = self._draft_key, self._draft_weight
        if (
            cached_key is not None
            and cached is not None
            and cached_key.device == key.device
            and cached.dtype == self.weight.dtype
            and torch.equal(cached_key, key)
        ):
            return cached
        rows = self.weight[key]
        self._draft_key, self._draft_weight = key.clone(), rows
        return rows


@dataclass(frozen=True)
class VerifierTensorNames:
    """Where a verifier checkpoint keeps the tensors a draft copies or targets need."""

    embed: str
    norm: str
    lm_head: str
    """The lm_head, or the input embedding when the verifier ties them and stores only that."""

    def layer(self, index: int) -> str:
        """Prefix of decoder layer `index`'s tensors (they sit beside the input embedding)."""
        return f"{self.embed.removesuffix('embed_tokens.weight')}layers.{index}."


def verifier_tensor_names(name_or_path: str | Path) -> VerifierTensorNames:
    """Locate the input embedding, final norm and lm_head in a safetensors verifier."""
    names = set(weight_locations(name_or_path))
    embed = _first_present(
        names, [f"{p}embed_tokens.weight" for p in _PREFIXES], name_or_path, "input embedding"
    )
    norm = _first_present(names, [f"{p}norm.weight" for p in _PREFIXES], name_or_path, "final norm")
    head = next((n for n in ("lm_head.weight", "language_model.lm_head.weight") if n in names), embed)
    return VerifierTensorNames(embed=embed, norm=norm, lm_head=head)


def _first_present(names: set[str], candidates: list[str], source: str | Path, what: str) -> str:
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise KeyError(f"{source}: no {what} tensor (looked for {candidates})")
