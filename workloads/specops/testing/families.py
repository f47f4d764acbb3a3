"""Tiny random-weight verifiers of every supported family, built from configs (no downloads).

Shapes are small but each family keeps what makes it different: Gemma's (1 + w) norms, scaled
embeddings, attention and final-logit soft-capping and sliding windows; gpt-oss attention sinks,
yarn rope and experts; Qwen3 q/k norms and tied embeddings; Mixtral/Qwen3-MoE experts; Phi-3's
fused projections. Norm weights and the lm_head are perturbed so that a head which ignores the
family's norm or logit rules gives visibly different targets.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from specops.testing.tiny import build_tiny_tokenizer

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
_WINDOW = 16
"""Sliding windows shorter than the test sequences, so the windowed layers really slide."""

FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
    "MixtralForCausalLM": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "Qwen3ForCausalLM": ("qwen3", {"tie_word_embeddings": True}),
    "Qwen3MoeForCausalLM": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
    ),
    "Gemma2ForCausalLM": (
        "gemma2",
        {
            "sliding_window": _WINDOW,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 4.0,
            "attn_logit_softcapping": 20.0,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
    ),
    "Gemma3ForCausalLM": (
        "gemma3_text",
        {
            "sliding_window": _WINDOW,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 4.0,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        },
    ),
    "GptOssForCausalLM": (
        "gpt_oss",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": _WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 8.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
                "rope_theta": 150000.0,
            },
        },
    ),
    "Phi3ForCausalLM": ("phi3", {"head_dim": None}),
}


def family_config(architecture: str, vocab_size: int, **special: int | None) -> Any:
    """The tiny transformers config of `architecture` (special token ids passed through)."""
    from transformers import AutoConfig

    model_type, extra = FAMILY_CONFIGS[architecture]
    values = {**_COMMON, "vocab_size": vocab_size, **extra, **special}
    if values.get("head_dim") is None:
        values.pop("head_dim")
    config = AutoConfig.for_model(model_type, **values)
    config.architectures = [architecture]
    return config


def build_family_verifier(architecture: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny `architecture` verifier with the tokenizer of `tokenizer_dir` into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_config(
        architecture,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.3)
        out = model.get_output_embeddings()
        out.weight.mul_(8.0)  # peaked next-token distributions, like a trained model's
    model.save_pretrained(out_dir)
    return out_dir


def tiny_tokenizer(out_dir: Path) -> Path:
    """The tiny BPE tokenizer with a Llama-3 style chat template (shared by every family)."""
    return build_tiny_tokenizer(out_dir)
