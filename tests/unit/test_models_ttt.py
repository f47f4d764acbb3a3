"""VerifierHead (frozen norm + lm_head read from safetensors) and the TTT step targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _models_support import VOCAB, build_verifier, packed_batch, verifier_states
from transformers import LlamaForCausalLM

from specops.example import ExampleDict
from specops.models.batch import DraftBatch
from specops.models.ttt import rows_needed, step_targets, step_valid
from specops.models.verifier_head import VerifierHead
from specops.models.vocab import build_vocab_mapping


def _t2d() -> torch.Tensor:
    t2d, _ = build_vocab_mapping({i: (i * 7) % 13 + 1 for i in range(VOCAB)}, VOCAB, 40)
    return t2d


def test_head_reproduces_verifier_logits(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    ids = torch.randint(0, VOCAB, (11,))
    _, last = verifier_states(verifier, ids)
    with torch.no_grad():
        expected = verifier(ids[None]).logits[0]
    head = VerifierHead.from_pretrained(verifier_dir)
    assert (head.vocab_size, head.hidden_size) == (VOCAB, 32)
    torch.testing.assert_close(head.logits(last), expected, rtol=1e-5, atol=1e-5)
    t2d = _t2d()
    torch.testing.assert_close(head.draft_logits(last, t2d), expected[:, t2d], rtol=1e-5, atol=1e-5)
    other = t2d.roll(1)
    torch.testing.assert_close(head.draft_logits(last, other), expected[:, other], rtol=1e-5, atol=1e-5)
    assert not any(True for _ in head.parameters()), "the head has nothing to train"


def test_head_reads_only_its_tensors_from_sharded_and_tied_checkpoints(tmp_path: Path) -> None:
    tied = build_verifier(tmp_path / "tied", tie=True)
    LlamaForCausalLM.from_pretrained(tmp_path / "tied").save_pretrained(
        tmp_path / "sharded", max_shard_size="20KB"
    )
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    head = VerifierHead.from_pretrained(tmp_path / "sharded")
    assert torch.equal(head.weight, tied.model.embed_tokens.weight)
    assert torch.equal(head.norm.weight, tied.model.norm.weight)


def test_head_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        VerifierHead.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        VerifierHead.from_pretrained(tmp_path)
    build_verifier(tmp_path / "v")
    with pytest.raises(ValueError, match="t2d must be bool"):
        VerifierHead.from_pretrained(tmp_path / "v").draft_logits(torch.zeros(2, 32), torch.ones(VOCAB))


def test_rows_needed_keeps_what_any_later_step_trains_on() -> None:
    where = [
        torch.tensor([[1, 0, 0, 0, 1]]),
        torch.tensor([[0, 1, 0, 0, 0]]),
        torch.tensor([[0, 0, 1, 0, 0]]),
    ]
    needed = rows_needed([w.bool() for w in where])
    assert [n.int().tolist() for n in needed] == [[[1, 1, 1, 0, 1]], [[0, 1, 1, 0, 0]], [[0, 0, 1, 0, 0]]]


def test_step_targets_shift_and_renormalize(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    docs = [torch.randint(0, VOCAB, (7,)), torch.randint(0, VOCAB, (6,))]
    batch = packed_batch(verifier, docs, row_len=16)
    batch.loss_mask[0, 2] = False
    head = VerifierHead.from_pretrained(verifier_dir)
    t2d = _t2d()
    targets = step_targets(batch, head, t2d, 3)
    full = torch.log_softmax(head.logits(batch.last_hidden)[0][:, t2d], dim=-1)
    for step, (logp, valid) in enumerate(targets):
        assert valid.dtype == torch.bool and logp.shape == (int(valid.sum()), 40)
        anchors = valid[0].nonzero().flatten().tolist()
        for row, t in enumerate(anchors):  # one row per valid anchor, in order
            torch.testing.assert_close(logp[row], full[t + 1 + step])
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(len(logp)))
        expected = [
            t + 1 + step < 13 and (t < 7) == (t + 1 + step < 7) and bool(batch.loss_mask[0, t + 1 + step])
            for t in range(16)
        ]
        assert valid[0].tolist() == expected
    assert torch.equal(targets[0][1], step_valid(batch, 0))
    with pytest.raises(ValueError, match="ttt_steps"):
        step_targets(batch, head, t2d, 0)


def test_draft_batch_from_example_splits_aux_and_last() -> None:
    example: ExampleDict = {
        "id": "ds/0/0",
        "token_ids": torch.arange(5, dtype=torch.int32),
        "loss_mask": torch.tensor([0, 1, 1, 0, 1], dtype=torch.uint8),
        "hidden_states": torch.randn(5, 4, 8),
    }
    batch = DraftBatch.from_example(example)
    assert batch.input_ids.dtype == torch.long and batch.shape == (1, 5)
    assert torch.equal(batch.aux_hidden[0], example["hidden_states"][:, :3])
    assert torch.equal(batch.last_hidden[0], example["hidden_states"][:, 3])
    assert batch.loss_mask.dtype == torch.bool and batch.document_ids.eq(0).all()
    with pytest.raises(ValueError, match="hidden_states"):
        DraftBatch.from_example({**example, "hidden_states": torch.randn(5, 8)})
