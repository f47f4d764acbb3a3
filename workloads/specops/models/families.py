"""The verifier families SpecOps trains drafts for, and which of them vLLM serves with an EAGLE-3 draft.

A family is listed here only when a tiny model of it runs the whole pipeline in the tests
(tests/unit/test_families.py): capture, training targets equal to the verifier's own logits,
training, lossless evaluation, export. Anything else is refused before any work, naming the
architecture, because an untested head or layer layout would give wrong targets silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from specops.config import ConfigError


@dataclass(frozen=True)
class Family:
    """One verifier architecture (the `architectures` entry of its config.json)."""

    name: str
    vllm_eagle3: bool
    """vLLM 0.32 implements `SupportsEagle3` for this class (it can serve an EAGLE-3 draft for it)."""


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("Llama", vllm_eagle3=True),
    "MistralForCausalLM": Family("Mistral", vllm_eagle3=True),
    "MixtralForCausalLM": Family("Mixtral", vllm_eagle3=False),
    "Qwen3ForCausalLM": Family("Qwen3", vllm_eagle3=True),
    "Qwen3MoeForCausalLM": Family("Qwen3-MoE", vllm_eagle3=True),
    "Gemma2ForCausalLM": Family("Gemma-2", vllm_eagle3=False),
    "Gemma3ForCausalLM": Family("Gemma-3 (text)", vllm_eagle3=False),
    "GptOssForCausalLM": Family("gpt-oss", vllm_eagle3=True),
    "Phi3ForCausalLM": Family("Phi-3", vllm_eagle3=True),
}


class UnsupportedVerifier(ConfigError):
    """The verifier's architecture is not one SpecOps has tested end to end."""


def architecture(config: Any) -> str:
    """The verifier's causal-LM class name: `architectures[0]`, else what its model_type maps to."""
    names = list(getattr(config, "architectures", None) or [])
    if names:
        return str(names[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = str(getattr(config, "model_type", ""))
    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type or "(none)"))


def verifier_family(config: Any, source: str) -> Family:
    """The family of a verifier config, or UnsupportedVerifier naming its architecture."""
    name = architecture(config)
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedVerifier(
            f"{source}: verifier architecture {name} is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return family


def unservable_draft(config: Any, num_layers: int, draft_layer_types: Sequence[str] = ()) -> str | None:
    """Why vLLM 0.32 could not serve a `num_layers` draft (of these layer types) for this verifier, or None.

    Sliding-window and full attention layers go into separate KV cache groups, and vLLM refuses a
    draft whose layers do not all fall into one group ("All drafting layers should belong to the
    same kv cache group"): a draft mixing the two types is refused (seen with a 2-layer sliding +
    full draft for Llama), and so is a multi-layer draft for a verifier mixing them (gpt-oss), where
    one layer is served and two are not (tests/unit/test_models_vllm.py).
    """
    mixed = sorted(set(draft_layer_types))
    if len(mixed) > 1:
        return (
            f"vLLM cannot serve a draft whose layers mix {' and '.join(mixed)} (two KV cache groups): "
            "give every layer the same type"
        )
    family = FAMILIES.get(architecture(config))
    types = set(getattr(config.get_text_config(), "layer_types", None) or [])
    if family is not None and family.vllm_eagle3 and num_layers > 1 and len(types) > 1:
        return (
            f"vLLM cannot serve a draft of {num_layers} layers for {family.name}, whose layers mix "
            f"{' and '.join(sorted(types))}: use 1"
        )
    return None
