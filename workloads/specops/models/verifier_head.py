"""The verifier's frozen final norm + lm_head: turns stored pre-norm last hidden states into targets.

Everything comes from the verifier's own code: its causal-LM class is built on the meta device
(no memory), its final norm module (RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm with bias: whatever
the class uses) gets the checkpoint's norm tensors, and the logits go through the class's own
`forward` after the lm_head (Gemma's final soft-capping, any logit scaling), with its decoder and
lm_head swapped for pass-throughs. Only the norm and lm_head tensors are read from the safetensors
(tied embeddings reuse the input embedding matrix), so building targets never loads the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from specops.models.families import verifier_family
from specops.models.safetensors_io import read_json, read_tensors, weight_locations

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
"""Where text decoders keep `norm`/`embed_tokens` (plain causal LMs first, then multimodal wrappers)."""


class _PassDecoder(nn.Module):
    """Stands in for the verifier's decoder: hands the (already final) hidden states on."""

    def forward(self, *_: Any, inputs_embeds: torch.Tensor, **__: Any) -> Any:
        from transformers.modeling_outputs import MoeModelOutputWithPast

        return MoeModelOutputWithPast(
            last_hidden_state=cast(torch.FloatTensor, inputs_embeds)
        )  # MoE classes read router_logits


class _GivenLogits(nn.Module):
    """Stands in for the verifier's lm_head: returns the logits computed outside."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: torch.Tensor | None = None

    def forward(self, _hidden: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            raise RuntimeError("no logits were handed to the verifier's forward")
        return self.logits


class _Finisher:
    """The verifier class's own `forward` after its lm_head (soft-capping, scaling), on given logits."""

    def __init__(self, shell: PreTrainedModel) -> None:
        self.shell = shell
        self.given = _GivenLogits()
        setattr(shell, shell.base_model_prefix, _PassDecoder())
        shell.set_output_embeddings(self.given)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        flat = raw.reshape(1, -1, raw.shape[-1])
        self.given.logits = flat
        try:
            out = self.shell(inputs_embeds=flat.new_empty(1, flat.shape[1], 0), use_cache=False).logits
        finally:
            self.given.logits = None
        return out.reshape(raw.shape)


def _frozen(module: nn.Module) -> nn.Module:
    """`module` with its parameters turned into buffers: they follow `.to()` but are never trained."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


class VerifierHead(nn.Module):
    """Frozen `finish(lm_head(norm(h)))` of the verifier; its tensors are buffers, never trained."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        norm: nn.Module,
        lm_head_weight: torch.Tensor,
        finish: _Finisher,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if lm_head_weight.dim() != 2:
            raise ValueError(f"lm_head {tuple(lm_head_weight.shape)} is not a matrix")
        self.norm = _frozen(norm)
        self.register_buffer("weight", lm_head_weight.detach().clone(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self._finish = finish
        self._draft_key: torch.Tensor | None = None
        self._draft_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

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
        """The final norm and lm_head (or the tied input embedding) of a safetensors verifier."""
        from transformers import AutoConfig, AutoModelForCausalLM

        data = read_json(name_or_path, "config.json")
        values = {k: v for k, v in data.items() if k != "model_type"}
        config = AutoConfig.for_model(str(data.get("model_type", "")), **values)
        verifier_family(config, str(name_or_path))
        names = verifier_tensor_names(name_or_path)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        norm = shell.get_decoder().norm
        prefix = names.norm.removesuffix("weight")
        wanted = {f"{prefix}{key}": key for key in norm.state_dict()}
        bias_name = names.lm_head.removesuffix("weight") + "bias"
        has_bias = names.lm_head != names.embed and bias_name in weight_locations(name_or_path)
        tensors = read_tensors(name_or_path, sorted({*wanted, names.lm_head, *([bias_name] * has_bias)}))
        norm.load_state_dict({key: tensors[name] for name, key in wanted.items()}, assign=True)
        head = cls(norm, tensors[names.lm_head], _Finisher(shell), tensors[bias_name] if has_bias else None)
        if head.hidden_size != int(config.get_text_config().hidden_size):
            raise ValueError(f"{name_or_path}: lm_head {tuple(head.weight.shape)} does not match hidden_size")
        return head.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else head

    def normed(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The verifier's final norm applied to pre-norm hidden states."""
        return self.norm(last_hidden.to(self.weight.dtype))

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """[..., V] verifier logits from [..., H] pre-norm last hidden states."""
        return self._finish(F.linear(self.normed(last_hidden), self.weight, self.bias))

    def draft_logits(self, last_hidden: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
        """[..., Vd] verifier logits of the draft vocabulary only (rows where `t2d` is true, in id order).

        The family's logit rules (soft-capping, scaling) act per logit, so applying them to the
        draft rows alone gives the same values as slicing the full logits."""
        weight, bias = self._rows(t2d)
        return self._finish(F.linear(self.normed(last_hidden), weight, bias))

    def _rows(self, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft-vocabulary rows of the lm_head (and bias), cached while `t2d` stays the same."""
        if t2d.dtype != torch.bool or t2d.shape != (self.vocab_size,):
            raise ValueError(f"t2d must be bool [{self.vocab_size}], got {t2d.dtype} {tuple(t2d.shape)}")
        key = t2d.to(self.weight.device)
        cached_key, cached = self._draft_key, self._draft_rows
        if (
            cached_key is not None
            and cached is not None
            and cached_key.device == key.device
            and cached[0].dtype == self.weight.dtype
            and torch.equal(cached_key, key)
        ):
            return cached
        rows = (self.weight[key], None if self.bias is None else self.bias[key])
        self._draft_key, self._draft_rows = key.clone(), rows
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
