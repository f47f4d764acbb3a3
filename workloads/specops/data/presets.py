"""Datasets by name: the chat sets that upstream EAGLE-3 recipes (vLLM's speculators, SGLang's
SpecForge) ship presets for, as the DatasetSource fields that read them.

Only sets whose rows are already conversations are here; sets that need a question/answer
rewrite first (GSM8K, Nemotron) are not, because a preset must read the same rows the upstream
recipes train on, not an approximation of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DatasetPreset = Literal[
    "sharegpt",
    "ultrachat",
    "magpie",
    "magpie-qwen2.5-pro-1m",
    "perfectblend",
    "perfectblend-llama3.1-8b-instruct",
    "perfectblend-llama3.3-70b-instruct",
    "eaglechat",
]


@dataclass(frozen=True)
class Preset:
    """Where a named dataset lives on the Hugging Face Hub and how its rows hold conversations."""

    path: str
    split: str
    messages: str
    """The column with the turn list; turns are read as ShareGPT `from/value` or OpenAI `role/content`."""
    upstream: str
    """Which upstream recipes use this set under this name (for docs/migrating.md)."""


PRESETS: dict[str, Preset] = {
    "sharegpt": Preset(
        "Aeala/ShareGPT_Vicuna_unfiltered", "train", "conversations", "speculators, SpecForge"
    ),
    "ultrachat": Preset("HuggingFaceH4/ultrachat_200k", "train_sft", "messages", "speculators, SpecForge"),
    "magpie": Preset(
        "Magpie-Align/Magpie-Llama-3.1-Pro-300K-Filtered", "train", "conversations", "speculators"
    ),
    "magpie-qwen2.5-pro-1m": Preset(
        "Magpie-Align/Magpie-Qwen2.5-Pro-1M-v0.1", "train", "conversations", "SpecForge"
    ),
    "perfectblend": Preset(
        "mlabonne/open-perfectblend", "train", "conversations", "speculators (open-perfectblend), SpecForge"
    ),
    "perfectblend-llama3.1-8b-instruct": Preset(
        "frankleeeee/PerfectBlend-Regenerated-Llama-3.1-8B-Instruct", "train", "conversations", "SpecForge"
    ),
    "perfectblend-llama3.3-70b-instruct": Preset(
        "frankleeeee/PerfectBlend-Regenerated-Llama-3.3-70B-Instruct", "train", "conversations", "SpecForge"
    ),
    "eaglechat": Preset("zhaode/EagleChat", "train", "conversations", "SpecForge"),
}


def preset_fields(name: str) -> dict[str, Any]:
    """The DatasetSource fields (snake_case) a preset stands for; {} for an unknown name (the
    `preset` field's own validation then names the allowed ones)."""
    preset = PRESETS.get(name)
    if preset is None:
        return {}
    return {
        "kind": "hf",
        "path": preset.path,
        "split": preset.split,
        "name": name,
        "columns": {"messages": preset.messages},
    }
