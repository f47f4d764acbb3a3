"""Import SafeAILab EAGLE-3 research checkpoints into the speculators format.

A research checkpoint is a directory with a Llama-style `config.json` (plus `draft_vocab_size`)
and weights named `fc.weight`, `midlayer.{self_attn,mlp,hidden_norm,input_layernorm,
post_attention_layernorm}.*`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d` and sometimes
`embed_tokens.weight`, stored as safetensors or as `pytorch_model.bin` (read with
`torch.load(weights_only=True)`, which refuses anything but tensors). The single `midlayer` becomes
`layers.0`; a missing embedding is copied from the verifier, which also supplies the defaults
for the auxiliary layer ids and the `speculators_config.verifier` record. The architecture flags
(`norm_before_fc` with `input_norm.weight`, `fc_norm` with `fc_norm.i.weight`, `norm_output`,
`layer_types` + `sliding_window`) carry over, top level or under `eagle_config`; a draft vLLM could
not serve for this verifier is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaConfig

from specops.engines.base import default_layer_ids
from specops.models.config import SpeculatorFormatError, SpeculatorsConfig, SpeculatorVerifierConfig
from specops.models.eagle3 import ARCHITECTURE, Eagle3DraftModel, Eagle3SpeculatorConfig
from specops.models.families import unservable_draft
from specops.models.safetensors_io import read_tensors, weight_locations
from specops.models.verifier_head import verifier_tensor_names
from specops.models.vocab import check_vocab_mapping

_LAYER = re.compile(r"^(?:model\.)?(?:midlayer|layers\.(\d+))\.(.+)$")
_TOP = {
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "embed_tokens.weight",
    "d2t",
    "t2d",
    "input_norm.weight",
}
_FC_NORM = re.compile(r"^fc_norm\.\d+\.weight$")
_LAYER_KEYS = set(LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling", "layer_types", "sliding_window"}
_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
"""Architecture flags read from the research config (top level, else `eagle_config`)."""
"""Research config keys that describe the decoder layer (everything else is dropped)."""


def load_research_weights(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of a research checkpoint: safetensors (single or sharded) or pytorch_model.bin."""
    if (source / "model.safetensors").is_file() or (source / "model.safetensors.index.json").is_file():
        return read_tensors(source, weight_locations(source))
    bins = sorted(source.glob("pytorch_model*.bin"))
    if not bins:
        safetensors = sorted(source.glob("*.safetensors"))
        if len(safetensors) == 1:
            return load_file(safetensors[0])
        raise FileNotFoundError(f"{source}: no model.safetensors or pytorch_model.bin to convert")
    out: dict[str, torch.Tensor] = {}
    for file in bins:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError and friends for non-tensor payloads
            raise SpeculatorFormatError(f"{file}: not a plain tensor checkpoint ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise SpeculatorFormatError(f"{file}: expected a mapping of tensor names to tensors")
        out.update(data)
    return out


def rename_research_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Research names -> our (vLLM) names: `midlayer.*` -> `layers.0.*`; unknown names are errors."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in tensors.items():
        bare = name.removeprefix("model.")
        match = _LAYER.match(name)
        if match:
            out[f"layers.{match.group(1) or 0}.{match.group(2)}"] = tensor
        elif bare in _TOP or _FC_NORM.match(bare):
            out[bare] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise SpeculatorFormatError(f"unknown tensors in the research checkpoint: {sorted(unknown)}")
    return out


def research_layer_config(config: dict[str, Any], num_layers: int) -> LlamaConfig:
    """The draft decoder config from a research config.json (legacy rope keys are understood)."""
    values = {k: v for k, v in config.items() if k in _LAYER_KEYS and k != "model_type"}
    values.update(num_hidden_layers=num_layers, tie_word_embeddings=False)
    layer = AutoConfig.for_model("llama", **values)
    if not isinstance(layer, LlamaConfig):  # pragma: no cover - for_model("llama") is a LlamaConfig
        raise SpeculatorFormatError("could not build a llama layer config")
    return layer


def convert_research_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    verifier: str | Path,
    verifier_name_or_path: str | None = None,
    speculative_tokens: int = 3,
    algorithm: Literal["eagle3", "hass"] = "eagle3",
    aux_layer_ids: Sequence[int] | None = None,
) -> Eagle3DraftModel:
    """Convert `source` into a speculators directory at `output`; returns the loaded draft.

    `verifier` is a local verifier directory (its config and, when the checkpoint has none, its
    embedding are read); `verifier_name_or_path` is what the output records (default: `verifier`).
    """
    src = Path(source)
    config_file = src / "config.json"
    try:
        research = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file}: research checkpoint has no config.json") from None
    except json.JSONDecodeError as exc:
        raise SpeculatorFormatError(f"{config_file}: not valid JSON: {exc}") from None
    tensors = rename_research_weights(load_research_weights(src))
    missing = sorted({"fc.weight", "norm.weight", "lm_head.weight"} - set(tensors))
    if missing or "layers.0.self_attn.q_proj.weight" not in tensors:
        raise SpeculatorFormatError(f"{src}: not an EAGLE-3 checkpoint; missing {missing or ['midlayer.*']}")
    num_layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("layers."))
    full_config = AutoConfig.from_pretrained(str(verifier))
    unservable = unservable_draft(full_config, num_layers, research.get("layer_types") or ())
    if unservable:
        raise SpeculatorFormatError(f"{src}: {unservable}")
    verifier_config = full_config.get_text_config()
    vocab = int(verifier_config.vocab_size)
    if int(research.get("vocab_size", vocab)) != vocab:
        raise SpeculatorFormatError(
            f"{config_file}: vocab_size {research.get('vocab_size')} != the verifier's {vocab}"
        )
    draft_vocab = int(tensors["lm_head.weight"].shape[0])
    t2d, d2t = _vocab_mapping(tensors, vocab, draft_vocab)
    hidden = int(research.get("hidden_size", verifier_config.hidden_size))
    target_hidden = research.get("target_hidden_size")
    if "embed_tokens.weight" not in tensors:
        embed_name = verifier_tensor_names(verifier).embed
        tensors["embed_tokens.weight"] = read_tensors(verifier, [embed_name])[embed_name]
    eagle_config = research.get("eagle_config") or {}
    flags: dict[str, Any] = {flag: bool(research.get(flag, eagle_config.get(flag, False))) for flag in _FLAGS}
    layer_ids = list(
        aux_layer_ids
        or eagle_config.get("eagle_aux_hidden_state_layer_ids")
        or research.get("eagle_aux_hidden_state_layer_ids")
        or default_layer_ids(int(verifier_config.num_hidden_layers))[:3]
    )
    config = Eagle3SpeculatorConfig(
        architectures=[ARCHITECTURE],
        transformer_layer_config=research_layer_config({**research, "vocab_size": vocab}, num_layers),
        draft_vocab_size=draft_vocab,
        **flags,
        target_hidden_size=int(target_hidden) if target_hidden and int(target_hidden) != hidden else None,
        eagle_aux_hidden_state_layer_ids=layer_ids,
        speculators_config=SpeculatorsConfig.greedy(
            algorithm,
            speculative_tokens,
            SpeculatorVerifierConfig.from_config(verifier_config, verifier_name_or_path or str(verifier)),
        ),
    )
    model = Eagle3DraftModel(config)
    expected = model.state_dict()
    state = {**tensors, "t2d": t2d, "d2t": d2t}
    problems = [
        f"{name} {tuple(state[name].shape)} != {tuple(ref.shape)}"
        for name, ref in expected.items()
        if name in state and state[name].shape != ref.shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if problems or missing or unexpected:
        raise SpeculatorFormatError(
            f"{src}: tensors do not fit config.json: {problems}; missing {missing}; not in the architecture "
            f"{unexpected} (norm_before_fc: {flags['norm_before_fc']}, fc_norm: {flags['fc_norm']})"
        )
    dtype = tensors["fc.weight"].dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    model.to(dtype)
    model.save_pretrained(output)
    return model


def _vocab_mapping(
    tensors: dict[str, torch.Tensor], vocab: int, draft_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2d, d2t) from the checkpoint; a checkpoint without them must predict the full vocabulary."""
    if "d2t" in tensors and "t2d" in tensors:
        t2d, d2t = tensors.pop("t2d").to(torch.bool), tensors.pop("d2t").to(torch.long)
        if t2d.numel() != vocab:
            raise SpeculatorFormatError(f"t2d has {t2d.numel()} entries but the verifier vocab is {vocab}")
        try:
            check_vocab_mapping(t2d, d2t)
        except ValueError as exc:
            raise SpeculatorFormatError(f"research checkpoint: {exc}") from None
        return t2d, d2t
    if draft_vocab != vocab:
        raise SpeculatorFormatError(
            f"research checkpoint has no d2t/t2d but its lm_head has {draft_vocab} rows (vocab {vocab})"
        )
    return torch.ones(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.long)
