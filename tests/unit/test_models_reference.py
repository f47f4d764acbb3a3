"""The reference `speculators` library reads a SpecOps speculator and drafts the same tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _models_support import new_draft, verifier_states
from transformers import LlamaConfig, LlamaForCausalLM

from specops.models.batch import DraftBatch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("speculators") is None, reason="speculators is not installed"
    ),
]


def test_reference_library_loads_and_matches(tmp_path: Path) -> None:
    from speculators import SpeculatorModel, SpeculatorModelConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    verifier = LlamaForCausalLM(config).eval()
    verifier.save_pretrained(tmp_path / "verifier")
    ours = new_draft(verifier, tmp_path / "verifier", algorithm="hass").eval()
    ours.save_pretrained(tmp_path / "spec")

    ref_config = SpeculatorModelConfig.from_pretrained(str(tmp_path / "spec"))
    assert ref_config.speculators_config.algorithm == "hass"
    assert ref_config.draft_vocab_size == 48 and ref_config.norm_before_residual is False
    reference = SpeculatorModel.from_pretrained(str(tmp_path / "spec")).eval()
    theirs = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs[name].to(tensor.dtype), tensor), name

    ids = torch.randint(0, 96, (129,), generator=torch.Generator().manual_seed(5))  # flex blocks of 128
    aux, last = verifier_states(verifier, ids)
    n = len(ids)
    batch = DraftBatch(
        input_ids=ids[None],
        aux_hidden=aux[None],
        last_hidden=last[None],
        loss_mask=torch.ones(1, n, dtype=torch.bool),
        position_ids=torch.arange(n)[None],
        document_ids=torch.zeros(1, n, dtype=torch.long),
    )
    with torch.no_grad():
        mine = [logits.argmax(-1)[0] for logits in ours.forward_ttt(batch, 3)]
        # the reference expects its data pre-shifted: (x[t+1], f[t]) at index t
        ref_tokens = reference(
            hidden_states=aux[None, :-1].flatten(-2),
            input_ids=ids[None, 1:],
            document_ids=torch.zeros(1, n - 1, dtype=torch.long),
            position_ids=torch.arange(1, n)[None],
            ttt_steps=3,
        )
    for step in range(3):
        usable = n - 1 - step
        assert torch.equal(mine[step][:usable], ref_tokens[step][0][:usable]), step
