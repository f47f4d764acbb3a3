"""Speculators format: config.json fields and tensor names as vLLM's loader reads them; save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models_support import new_draft, packed_batch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from specops.models.base import SpeculatorModel
from specops.models.config import (
    SpeculatorFormatError,
    SpeculatorModelConfig,
    SpeculatorsConfig,
    SpeculatorVerifierConfig,
    TokenProposalConfig,
)
from specops.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

VLLM_TOP_LEVEL = {
    "architectures",
    "speculators_model_type",
    "speculators_config",
    "transformer_layer_config",
    "draft_vocab_size",
    "norm_before_residual",
    "target_hidden_size",
    "eagle_aux_hidden_state_layer_ids",
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "embed_requires_grad",
    "speculators_version",
}
"""Every key SpecOps writes; each one is read by vLLM's speculators loader or the reference library."""


def vllm_view(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What vLLM derives from a speculators config.json: (draft hf config, speculative config).

    Restates the contract of vllm/transformers_utils/configs/speculators (base.py + algos.py).
    """
    spec = config["speculators_config"]
    method = spec["proposal_methods"][0]
    assert isinstance(config["transformer_layer_config"], dict)
    assert spec["verifier"]["name_or_path"]
    hf = dict(config["transformer_layer_config"])
    hf["draft_vocab_size"] = config["draft_vocab_size"]
    hf["norm_before_residual"] = config["norm_before_residual"]
    hf["architectures"] = ["Eagle3LlamaForCausalLM"]
    hf["eagle_aux_hidden_state_layer_ids"] = config["eagle_aux_hidden_state_layer_ids"]
    hf["num_lookahead_tokens"] = method["speculative_tokens"]
    return hf, {
        "method": config["speculators_model_type"],
        "num_speculative_tokens": method["speculative_tokens"],
    }


def vllm_param_name(name: str) -> str | None:
    """The Eagle3LlamaForCausalLM parameter a checkpoint tensor loads into (None = skipped)."""
    if "t2d" in name:
        return None
    if "d2t" in name:
        return "draft_id_to_target_id"
    full = name if "lm_head" in name else f"model.{name}"
    for shard, fused in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj")):
        full = full.replace(shard, fused)
    return full.replace(".gate_proj", ".gate_up_proj").replace(".up_proj", ".gate_up_proj")


def vllm_params(num_layers: int) -> set[str]:
    """Parameters of vLLM's Eagle3LlamaForCausalLM for `num_layers` draft layers."""
    out = {
        "model.embed_tokens.weight",
        "model.fc.weight",
        "model.norm.weight",
        "lm_head.weight",
        "draft_id_to_target_id",
    }
    for i in range(num_layers):
        p = f"model.layers.{i}."
        out |= {
            f"{p}self_attn.qkv_proj.weight",
            f"{p}self_attn.o_proj.weight",
            f"{p}mlp.gate_up_proj.weight",
            f"{p}mlp.down_proj.weight",
            f"{p}input_layernorm.weight",
            f"{p}post_attention_layernorm.weight",
            f"{p}hidden_norm.weight",
        }
    return out


@pytest.mark.parametrize("num_layers", [1, 2])
def test_saved_speculator_has_exactly_the_fields_vllm_reads(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path, num_layers: int
) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=num_layers, speculative_tokens=4, algorithm="hass")
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) == VLLM_TOP_LEVEL
    assert config["norm_before_residual"] is False, "written explicitly (vLLM defaults it to True)"
    assert config["architectures"] == ["Eagle3DraftModel"]
    assert config["speculators_version"] == "0.9.0"
    assert config["norm_before_fc"] is False and config["norm_output"] is False
    assert config["speculators_config"] == {
        "algorithm": "hass",
        "default_proposal_method": "greedy",
        "proposal_methods": [
            {
                "proposal_type": "greedy",
                "speculative_tokens": 4,
                "verifier_accept_k": 1,
                "accept_tolerance": 0.0,
            }
        ],
        "verifier": {"name_or_path": str(verifier_dir), "architectures": ["LlamaForCausalLM"]},
    }
    hf, speculative = vllm_view(config)
    assert speculative == {"method": "eagle3", "num_speculative_tokens": 4}
    assert hf["model_type"] == "llama" and hf["num_hidden_layers"] == num_layers
    assert (hf["hidden_size"], hf["vocab_size"], hf["draft_vocab_size"]) == (32, 96, 48)
    assert hf["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    for key in (
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "rms_norm_eps",
    ):
        assert key in hf, key

    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("d2t").dtype == torch.int64
        assert handle.get_tensor("t2d").dtype == torch.bool
        assert tuple(handle.get_tensor("layers.0.self_attn.q_proj.weight").shape) == (32, 64), "2H input"
        assert tuple(handle.get_tensor("fc.weight").shape) == (32, 96), "3H -> H"
        assert tuple(handle.get_tensor("lm_head.weight").shape) == (48, 32)
    mapped = {vllm_param_name(n) for n in names} - {None}
    expected = vllm_params(num_layers)
    assert mapped <= expected, mapped - expected
    # vLLM builds a hidden_norm in every layer but only layer 0 uses it
    assert expected - mapped == {f"model.layers.{i}.hidden_norm.weight" for i in range(1, num_layers)}


def test_full_vocabulary_drafts_save_no_vocab_maps(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    """vLLM creates no draft_id_to_target_id for a full-vocabulary draft and rejects a d2t tensor."""
    draft = new_draft(verifier, verifier_dir, draft_vocab=96)
    draft.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert not names & {"d2t", "t2d"}
    assert {vllm_param_name(n) for n in names} == vllm_params(1) - {"draft_id_to_target_id"}
    loaded = SpeculatorModel.from_pretrained(tmp_path)
    assert isinstance(loaded, Eagle3DraftModel)
    assert loaded.t2d.all() and not loaded.d2t.any()


def test_save_load_gives_identical_logits(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2, layer_style="qwen3").eval()
    batch = packed_batch(verifier, [torch.arange(9) % 96, torch.arange(5) + 40])
    draft.save_pretrained(tmp_path)
    loaded = SpeculatorModel.from_pretrained(tmp_path)
    assert isinstance(loaded, Eagle3DraftModel)
    assert loaded.config.speculators_dict() == draft.config.speculators_dict()
    with torch.no_grad():
        for a, b in zip(draft.forward_ttt(batch, 3), loaded.forward_ttt(batch, 3), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    assert not any(
        p.requires_grad
        for n, p in loaded.named_parameters()
        if n in ("embed_tokens.weight", "lm_head.weight")
    )
    assert not list(tmp_path.glob(".*.tmp")), "no temp files left behind"


def test_config_round_trip_and_registry(tmp_path: Path) -> None:
    spec = SpeculatorsConfig.greedy("eagle3", 2, SpeculatorVerifierConfig(name_or_path="org/model"))
    config = Eagle3SpeculatorConfig(
        transformer_layer_config={
            "model_type": "llama",
            "hidden_size": 16,
            "num_attention_heads": 2,
            "vocab_size": 50,
        },
        draft_vocab_size=20,
        speculators_config=spec,
    )
    config.save_pretrained(tmp_path)
    again = SpeculatorModelConfig.from_pretrained(tmp_path)
    assert isinstance(again, Eagle3SpeculatorConfig)
    assert again.spec.speculative_tokens == 2
    assert again.speculators_dict() == config.speculators_dict()
    assert again.layer_config.hidden_size == 16


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("speculators_model_type"), "speculators_model_type is missing"),
        (lambda c: c.update(speculators_model_type="medusa"), "not supported"),
        (lambda c: c.pop("speculators_config"), "speculators_config is missing"),
        (lambda c: c.pop("transformer_layer_config"), "transformer_layer_config is missing"),
        (lambda c: c["speculators_config"].update(algorithm="magic"), r"speculators_config\.algorithm"),
        (lambda c: c["speculators_config"].update(default_proposal_method="tree"), "default_proposal_method"),
        (lambda c: c["speculators_config"].update(proposal_methods=[]), "proposal_methods"),
        (lambda c: c.update(draft_vocab_size=1000), "draft_vocab_size"),
    ],
)
def test_bad_config_json_names_the_field(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path, mutate: Any, message: str
) -> None:
    new_draft(verifier, verifier_dir).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    mutate(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorFormatError, match=message):
        SpeculatorModel.from_pretrained(tmp_path)


def test_broken_directories_fail_clearly(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        SpeculatorModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpeculatorFormatError, match="not valid JSON"):
        SpeculatorModel.from_pretrained(tmp_path)
    new_draft(verifier, verifier_dir).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpeculatorFormatError, match="safetensors"):
        SpeculatorModel.from_pretrained(tmp_path)
    two_layers = tmp_path / "two"
    new_draft(verifier, verifier_dir, num_layers=2).save_pretrained(two_layers)
    (tmp_path / "model.safetensors").write_bytes((two_layers / "model.safetensors").read_bytes())
    with pytest.raises(SpeculatorFormatError, match=r"unexpected tensors \['layers\.1"):
        SpeculatorModel.from_pretrained(tmp_path)


def test_proposal_and_verifier_configs() -> None:
    assert TokenProposalConfig().model_dump() == {
        "proposal_type": "greedy",
        "speculative_tokens": 3,
        "verifier_accept_k": 1,
        "accept_tolerance": 0.0,
    }
    with pytest.raises(ValueError, match="speculative_tokens"):
        TokenProposalConfig(speculative_tokens=0)
    from transformers import LlamaConfig

    verifier = SpeculatorVerifierConfig.from_config(
        LlamaConfig(architectures=["LlamaForCausalLM"]), "/models/x"
    )
    assert verifier.model_dump() == {"name_or_path": "/models/x", "architectures": ["LlamaForCausalLM"]}
