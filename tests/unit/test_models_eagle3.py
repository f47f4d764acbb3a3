"""Eagle3DraftModel: shapes, trainable parameters, TTT semantics (packing, causality, inference parity)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models_support import AUX_LAYERS, VOCAB, build_verifier, new_draft, packed_batch, stack_rows
from transformers import LlamaForCausalLM

from specops.models.batch import DraftBatch
from specops.models.eagle3 import Eagle3DraftModel
from specops.models.ttt import step_targets, step_valid
from specops.models.verifier_head import VerifierHead


def _docs(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def test_forward_ttt_shapes_and_frozen_copies(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2)
    batch = stack_rows([packed_batch(verifier, _docs(7, 5)), packed_batch(verifier, _docs(9, seed=1), 12)])
    logits = draft.forward_ttt(batch, 3)
    assert len(logits) == 3
    assert all(x.shape == (2, 12, 48) for x in logits)
    assert all(torch.isfinite(x).all() for x in logits)
    # embeddings, final norm and lm_head rows come from the verifier
    assert torch.equal(draft.embed_tokens.weight, verifier.model.embed_tokens.weight)
    assert torch.equal(draft.norm.weight, verifier.model.norm.weight)
    assert torch.equal(draft.lm_head.weight, verifier.lm_head.weight[draft.t2d])


def test_logits_at_marked_positions_equal_the_full_logits_there(
    verifier: LlamaForCausalLM, verifier_dir: Path
) -> None:
    """`forward_ttt(where=...)` computes only what the loss needs, with the same values and gradients."""
    from specops.train.losses import LossSpec, draft_loss, step_valid_counts

    draft = new_draft(verifier, verifier_dir, num_layers=2)
    head = VerifierHead.from_pretrained(verifier_dir)
    batch = stack_rows([packed_batch(verifier, _docs(7, 5)), packed_batch(verifier, _docs(9, seed=1), 12)])
    batch.loss_mask[0, :4] = False  # a prompt: context keys only
    batch.loss_mask[1, 5] = False
    targets = step_targets(batch, head, draft.t2d, 3)
    where = [valid for _, valid in targets]
    assert 0 < int(where[0].sum()) < where[0].numel()  # some positions are skipped
    full = draft.forward_ttt(batch, 3)
    chosen = draft.forward_ttt(batch, 3, where=where)
    for step, (rows, mask) in enumerate(zip(chosen, where, strict=True)):
        assert rows.shape == (int(mask.sum()), 48)
        torch.testing.assert_close(rows, full[step][mask], rtol=1e-5, atol=1e-5)
    spec = LossSpec("hass", step_decay=0.8)
    loss_full, sums_full = draft_loss(full, targets, step_valid_counts(targets), spec)
    loss_rows, sums_rows = draft_loss(chosen, targets, step_valid_counts(targets), spec)
    torch.testing.assert_close(loss_rows, loss_full, rtol=1e-5, atol=1e-5)
    assert torch.equal(sums_rows[1:], sums_full[1:])  # token counts and accuracies
    trainable = [p for p in draft.parameters() if p.requires_grad]
    grads_full = torch.autograd.grad(loss_full, trainable)
    grads_rows = torch.autograd.grad(loss_rows, trainable)
    for g_rows, g_full in zip(grads_rows, grads_full, strict=True):
        torch.testing.assert_close(g_rows, g_full, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="where has 2 masks for 3 TTT steps"):
        draft.forward_ttt(batch, 3, where=where[:2])
    with pytest.raises(ValueError, match="fit neither the valid mask"):
        draft_loss([x[:-1] for x in chosen], targets, step_valid_counts(targets), spec)


def test_gradients_reach_only_trainable_parameters(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2)
    batch = packed_batch(verifier, _docs(10))
    loss = sum((x * torch.randn_like(x)).sum() for x in draft.forward_ttt(batch, 2))
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    frozen = {"embed_tokens.weight", "lm_head.weight"}
    for name, param in draft.named_parameters():
        if name in frozen:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert {n for n, _ in draft.named_buffers() if n in ("d2t", "t2d")} == {"d2t", "t2d"}


def test_packed_row_equals_separate_documents(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2)
    docs = _docs(6, 9, 4, seed=3)
    packed = packed_batch(verifier, docs, row_len=22)
    packed_logits = draft.forward_ttt(packed, 3)
    start = 0
    for doc in docs:
        alone = packed_batch(verifier, [doc])
        alone_logits = draft.forward_ttt(alone, 3)
        for step in range(3):
            valid = step_valid(alone, step)[0]
            got = packed_logits[step][0, start : start + len(doc)][valid]
            torch.testing.assert_close(got, alone_logits[step][0][valid], rtol=1e-5, atol=1e-5)
            # the packed row marks exactly the same positions valid
            assert torch.equal(step_valid(packed, step)[0, start : start + len(doc)], valid)
        start += len(doc)
    assert not any(step_valid(packed, s)[0, start:].any() for s in range(3)), "padding is never a target"


def test_step_logits_depend_only_on_what_inference_has(
    verifier: LlamaForCausalLM, verifier_dir: Path
) -> None:
    """Step i at index t may read tokens up to t+1+i and verifier features up to t, nothing later."""
    draft = new_draft(verifier, verifier_dir)
    batch = packed_batch(verifier, _docs(12, seed=4))
    base = draft.forward_ttt(batch, 3)
    t = 5
    for step in range(3):
        changed_ids = batch.input_ids.clone()
        changed_ids[0, t + 2 + step :] = (changed_ids[0, t + 2 + step :] + 1) % VOCAB
        changed_aux = batch.aux_hidden.clone()
        changed_aux[0, t + 1 :] += 1.0
        changed = DraftBatch(
            input_ids=changed_ids,
            aux_hidden=changed_aux,
            last_hidden=batch.last_hidden,
            loss_mask=batch.loss_mask,
            position_ids=batch.position_ids,
            document_ids=batch.document_ids,
        )
        out = draft.forward_ttt(changed, 3)
        torch.testing.assert_close(out[step][0, : t + 1], base[step][0, : t + 1])
        # ... and it does read the token at t+1+step
        poked = batch.input_ids.clone()
        poked[0, t + 1 + step] = (poked[0, t + 1 + step] + 1) % VOCAB
        poked_batch = DraftBatch(**{**batch.__dict__, "input_ids": poked})
        assert not torch.allclose(draft.forward_ttt(poked_batch, 3)[step][0, t], base[step][0, t])


def test_training_forward_matches_inference_chain(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    """Feeding the proposed tokens as teacher-forced inputs reproduces the greedy chain exactly."""
    draft = new_draft(verifier, verifier_dir, num_layers=2)
    prompt = _docs(9, seed=5)[0]
    n = len(prompt) - 1
    full = packed_batch(verifier, [prompt])
    proposed = draft.propose(full.input_ids, full.aux_hidden[:, :n], 3)[0]
    extended_ids = torch.cat([prompt, proposed[:-1]])
    pad = len(extended_ids) - len(prompt)
    batch = DraftBatch(
        input_ids=extended_ids[None],
        aux_hidden=torch.cat([full.aux_hidden, full.aux_hidden[:, :pad]], dim=1),
        last_hidden=torch.cat([full.last_hidden, full.last_hidden[:, :pad]], dim=1),
        loss_mask=torch.ones(1, len(extended_ids), dtype=torch.bool),
        position_ids=torch.arange(len(extended_ids))[None],
        document_ids=torch.zeros(1, len(extended_ids), dtype=torch.long),
    )
    logits = draft.forward_ttt(batch, 3)
    chain = [draft.to_target_ids(logits[i][0, n - 1].argmax()) for i in range(3)]
    assert torch.stack(chain).tolist() == proposed.tolist()


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_draft_learns_targets(verifier: LlamaForCausalLM, verifier_dir: Path, num_layers: int) -> None:
    """A few Adam steps on forward KL lower the loss at every depth (stability with >= 2 layers)."""
    draft = new_draft(verifier, verifier_dir, num_layers=num_layers)
    head = VerifierHead.from_pretrained(verifier_dir)
    batch = stack_rows(
        [packed_batch(verifier, _docs(8, 8, seed=6)), packed_batch(verifier, _docs(16, seed=7))]
    )
    targets = step_targets(batch, head, draft.t2d, 2)
    optim = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)

    def loss_fn() -> torch.Tensor:
        total = torch.zeros(())
        for logits, (logp, valid) in zip(draft.forward_ttt(batch, 2), targets, strict=True):
            kl = (logp.exp() * (logp - torch.log_softmax(logits[valid], -1))).sum(-1)
            total = total + kl.mean()
        return total

    first = loss_fn()
    for _ in range(25):
        optim.zero_grad()
        loss = loss_fn()
        loss.backward()
        optim.step()
    final = loss_fn()
    assert torch.isfinite(final)
    assert final < 0.7 * first


def test_qwen3_style_layers_have_qk_norm(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2, layer_style="qwen3")
    names = set(draft.state_dict())
    assert {"layers.0.self_attn.q_norm.weight", "layers.1.self_attn.k_norm.weight"} <= names
    assert draft.config.layer_config.model_type == "qwen3"
    logits = draft.forward_ttt(packed_batch(verifier, _docs(6)), 2)
    assert logits[1].shape == (1, 6, 48)


def test_norm_before_residual_changes_the_first_layer(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    batch = packed_batch(verifier, _docs(6, seed=8))
    plain = new_draft(verifier, verifier_dir, seed=3)
    normed = new_draft(verifier, verifier_dir, seed=3, norm_before_residual=True)
    assert normed.config.norm_before_residual
    assert not torch.allclose(plain.forward_ttt(batch, 1)[0], normed.forward_ttt(batch, 1)[0])


def test_tied_verifier_embeddings_become_the_lm_head(tmp_path: Path) -> None:
    tied = build_verifier(tmp_path, tie=True, seed=2)
    draft = new_draft(tied, tmp_path)
    assert torch.equal(draft.lm_head.weight, tied.model.embed_tokens.weight[draft.t2d])


@pytest.mark.parametrize("num_layers", [1, 2])
def test_init_from_verifier_starts_from_its_last_layers(
    verifier: LlamaForCausalLM, verifier_dir: Path, num_layers: int
) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=num_layers, init_from_verifier=True)
    random = new_draft(verifier, verifier_dir, num_layers=num_layers)
    source, hidden = verifier.model.layers, verifier.config.hidden_size
    for index, layer in enumerate(draft.layers):
        src = source[len(source) - num_layers + index]
        for proj in ("q_proj", "k_proj", "v_proj"):
            got, want = getattr(layer.self_attn, proj).weight, getattr(src.self_attn, proj).weight
            if index == 0:  # [embed; hidden] input: the verifier's projection reads the hidden half
                assert torch.equal(got[:, hidden:], want)
                assert torch.equal(
                    got[:, :hidden], getattr(random.layers[0].self_attn, proj).weight[:, :hidden]
                )
            else:
                assert torch.equal(got, want)
        assert torch.equal(layer.self_attn.o_proj.weight, src.self_attn.o_proj.weight)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(layer.mlp, proj).weight, getattr(src.mlp, proj).weight)
        assert torch.equal(layer.post_attention_layernorm.weight, src.post_attention_layernorm.weight)
        assert torch.equal(layer.input_layernorm.weight, src.input_layernorm.weight)
    assert torch.equal(
        draft.layers[0].hidden_norm.weight, source[len(source) - num_layers].input_layernorm.weight
    )
    aux = torch.randn(5, len(AUX_LAYERS), hidden)
    assert torch.equal(draft.fuse(aux), aux[:, AUX_LAYERS.index(max(AUX_LAYERS))])
    assert all(p.requires_grad for n, p in draft.named_parameters() if n.startswith(("fc.", "layers.")))


def test_init_from_verifier_passes_the_deepest_aux_layer_whatever_its_slot(
    verifier: LlamaForCausalLM, verifier_dir: Path
) -> None:
    draft = new_draft(verifier, verifier_dir)
    draft.config.eagle_aux_hidden_state_layer_ids = [3, 1, 2]
    draft.init_from_verifier_layers(verifier_dir, verifier.config.num_hidden_layers)
    aux = torch.randn(4, 3, verifier.config.hidden_size)
    assert torch.equal(draft.fuse(aux), aux[:, 0])


def test_init_from_verifier_into_qwen3_style_layers_keeps_their_qk_norms(
    verifier: LlamaForCausalLM, verifier_dir: Path
) -> None:
    draft = new_draft(verifier, verifier_dir, layer_style="qwen3", init_from_verifier=True)
    assert torch.equal(
        draft.layers[0].self_attn.q_norm.weight, torch.ones_like(draft.layers[0].self_attn.q_norm.weight)
    )
    assert torch.equal(draft.layers[0].mlp.up_proj.weight, verifier.model.layers[-1].mlp.up_proj.weight)


def test_bad_inputs_name_the_problem(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    draft = new_draft(verifier, verifier_dir)
    batch = packed_batch(verifier, _docs(6))
    with pytest.raises(ValueError, match="aux layers"):
        draft.forward_ttt(DraftBatch(**{**batch.__dict__, "aux_hidden": batch.aux_hidden[:, :, :2]}), 1)
    with pytest.raises(ValueError, match="ttt_steps"):
        draft.forward_ttt(batch, 0)
    with pytest.raises(ValueError, match=r"DraftBatch\.loss_mask"):
        DraftBatch(**{**batch.__dict__, "loss_mask": batch.loss_mask[:, :3]})
    with pytest.raises(ValueError, match=r"DraftBatch\.last_hidden"):
        DraftBatch(**{**batch.__dict__, "last_hidden": batch.last_hidden[..., :5]})
    with pytest.raises(ValueError, match="propose"):
        draft.propose(batch.input_ids, batch.aux_hidden, 2)
    with pytest.raises(ValueError, match="init_from_verifier: the verifier has 4 layers, the draft 5"):
        new_draft(verifier, verifier_dir, num_layers=5, init_from_verifier=True)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[:10] = True
    with pytest.raises(ValueError, match="disagree"):
        Eagle3DraftModel.from_training_args(
            verifier.config, t2d, torch.ones(10, dtype=torch.long), verifier_name_or_path=str(verifier_dir)
        )
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Eagle3DraftModel.from_training_args(
            verifier.config,
            t2d,
            torch.zeros(10, dtype=torch.long),
            verifier_name_or_path=str(verifier_dir),
            draft_vocab_size=12,
        )


def test_chunked_attention_matches_unchunked(
    verifier: LlamaForCausalLM, verifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2)
    batch = packed_batch(verifier, _docs(20, 25, seed=9), row_len=48)
    with torch.no_grad():
        whole = draft.forward_ttt(batch, 3)
        monkeypatch.setattr("specops.models.eagle3._ATTENTION_BUDGET", 1)  # 16-row query chunks
        chunked = draft.forward_ttt(batch, 3)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_incremental_context_matches_fresh_proposals(verifier: LlamaForCausalLM, verifier_dir: Path) -> None:
    """Reusing the draft's step-0 context across inference steps gives the same chains as recomputing."""
    draft = new_draft(verifier, verifier_dir, num_layers=2)
    tokens = _docs(16, seed=10)[0]
    full = packed_batch(verifier, [tokens])
    context = draft.new_context()
    for n in (4, 5, 9, 10, 15):  # prefixes with verifier features for the first n tokens
        ids, aux = full.input_ids[:, : n + 1], full.aux_hidden[:, :n]
        assert torch.equal(draft.propose(ids, aux, 3, context), draft.propose(ids, aux, 3))
        assert context.length == n
    with pytest.raises(ValueError, match="already in the context"):
        draft.propose(full.input_ids[:, :16], full.aux_hidden[:, :15], 3, context)


def test_a_narrower_draft_records_the_target_width_and_trains_its_own_vocab_layers(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    draft = new_draft(verifier, verifier_dir, num_layers=2, hidden_size=24)
    assert draft.config.target_hidden_size == 32 and draft.config.layer_config.hidden_size == 24
    assert draft.fc.weight.shape == (24, 3 * 32)
    assert draft.embed_tokens.weight.requires_grad and draft.lm_head.weight.requires_grad
    batch = packed_batch(verifier, _docs(7, 5))
    assert all(x.shape == (1, 12, 48) for x in draft.forward_ttt(batch, 2))
    draft.save_pretrained(tmp_path / "narrow")
    again = Eagle3DraftModel.from_pretrained(tmp_path / "narrow")
    torch.testing.assert_close(again.forward_ttt(batch, 2)[1], draft.forward_ttt(batch, 2)[1])
    same = new_draft(verifier, verifier_dir, hidden_size=32)
    assert same.config.target_hidden_size is None and not same.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="init_from_verifier copies the verifier's layers"):
        new_draft(verifier, verifier_dir, hidden_size=24, init_from_verifier=True)
