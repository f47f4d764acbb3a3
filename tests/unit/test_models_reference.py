"""The reference `speculators` library and SpecOps read each other's speculators, architecture
flags included: `norm_before_fc`, `fc_norm`, `norm_output` and sliding-window layers
(`layer_types` + `sliding_window`).

For each combination (and the plain architecture) a checkpoint written by the reference `speculators` library loads in SpecOps
and one written by SpecOps loads in the reference library, and the two forwards give the same
logits on the same inputs at every teacher-forced TTT step (norm_output changes what the next
step reads, so steps 1 and 2 are where a wrong reading shows). SpecOps' inference path
(`propose`, what the evaluator drafts with) must agree with its own training forward.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models_support import AUX_LAYERS, verifier_states
from transformers import LlamaConfig, LlamaForCausalLM

from specops.models.base import SpeculatorModel
from specops.models.batch import DraftBatch
from specops.models.config import SpeculatorFormatError
from specops.models.eagle3 import Eagle3DraftModel
from specops.models.vocab import build_vocab_mapping

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("speculators") is None, reason="speculators is not installed"
    ),
]

VOCAB, DRAFT_VOCAB, STEPS, N = 96, 48, 3, 129  # 129 tokens: flex attention blocks of 128 and a tail
SLIDING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 5}
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "norm_before_fc": {"norm_before_fc": True},
    "norm_output": {"norm_output": True},
    "norm_before_fc+norm_output": {"norm_before_fc": True, "norm_output": True},
    "fc_norm+norm_output": {"fc_norm": True, "norm_output": True},
    "sliding": {"norm_before_fc": True, "norm_output": True, **SLIDING},
}


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("verifier")
    model.save_pretrained(path)
    return model, path


def _mapping() -> tuple[torch.Tensor, torch.Tensor]:
    return build_vocab_mapping({i: VOCAB - i for i in range(VOCAB)}, VOCAB, DRAFT_VOCAB)


def _shake_norms(model: torch.nn.Module) -> None:
    """Norm weights away from 1, so a norm applied in the wrong place changes the logits."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


def _upstream_draft(verifier_dir: Path, verifier_config: LlamaConfig, flags: dict[str, Any]) -> Any:
    """A random draft built by the reference library itself, with `flags`."""
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3DraftModel as Upstream
    from speculators.models.eagle3 import Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    layers = len(flags.get("layer_types", [])) or 1
    layer = LlamaConfig(
        **{
            k: v
            for k, v in verifier_config.to_dict().items()
            if k not in ("architectures", "num_hidden_layers", "dtype", "transformers_version")
        },
        num_hidden_layers=layers,
        **{k: flags[k] for k in ("layer_types", "sliding_window") if k in flags},
    )
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=layer,
        draft_vocab_size=DRAFT_VOCAB,
        norm_before_residual=False,
        eagle_aux_hidden_state_layer_ids=list(AUX_LAYERS),
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=STEPS)],
            default_proposal_method="greedy",
            verifier=VerifierConfig.from_pretrained(str(verifier_dir)),
        ),
        **{k: v for k, v in flags.items() if k in ("norm_before_fc", "fc_norm", "norm_output")},
    )
    torch.manual_seed(3)
    model = Upstream(config)
    model.load_vocab_mappings(*_mapping())
    with torch.no_grad():  # left empty for load_verifier_weights, which this test does not call
        model.embed_tokens.weight.normal_(std=0.5)
        model.lm_head.weight.normal_(std=0.05)
    _shake_norms(model)
    return model.eval()


def _specops_draft(verifier: LlamaForCausalLM, verifier_dir: Path, flags: dict[str, Any]) -> Eagle3DraftModel:
    torch.manual_seed(3)
    model = Eagle3DraftModel.from_training_args(
        verifier.config,
        *_mapping(),
        verifier_name_or_path=str(verifier_dir),
        num_layers=len(flags.get("layer_types", [])) or 1,
        aux_layer_ids=list(AUX_LAYERS),
        speculative_tokens=STEPS,
        algorithm="hass",
        **flags,
    )
    _shake_norms(model)
    return model.eval()


def _inputs(verifier: LlamaForCausalLM) -> tuple[torch.Tensor, torch.Tensor, DraftBatch]:
    ids = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(5))
    aux, last = verifier_states(verifier, ids)
    batch = DraftBatch(
        input_ids=ids[None],
        aux_hidden=aux[None],
        last_hidden=last[None],
        loss_mask=torch.ones(1, N, dtype=torch.bool),
        position_ids=torch.arange(N)[None],
        document_ids=torch.zeros(1, N, dtype=torch.long),
    )
    return ids, aux, batch


def _upstream_logits(model: Any, ids: torch.Tensor, aux: torch.Tensor) -> list[torch.Tensor]:
    """The reference forward's logits per TTT step (read off its lm_head; it returns only argmaxes)."""
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out[0].detach()))
    try:
        with torch.no_grad():  # the reference takes its data pre-shifted: (x[t+1], f[t]) at index t
            model(
                hidden_states=aux[None, :-1].flatten(-2),
                input_ids=ids[None, 1:],
                document_ids=torch.zeros(1, N - 1, dtype=torch.long),
                position_ids=torch.arange(1, N)[None],
                ttt_steps=STEPS,
            )
    finally:
        hook.remove()
    return seen


def _assert_same_logits(ours: Eagle3DraftModel, theirs: Any, verifier: LlamaForCausalLM) -> None:
    ids, aux, batch = _inputs(verifier)
    with torch.no_grad():
        mine = ours.forward_ttt(batch, STEPS)
    reference = _upstream_logits(theirs, ids, aux)
    assert len(reference) == STEPS
    for step in range(STEPS):
        usable = N - 1 - step  # the reference's rows past this have no next token to read
        torch.testing.assert_close(mine[step][0, :usable], reference[step][:usable], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_upstream_checkpoint_loads_and_matches(
    case: str, verifier: tuple[LlamaForCausalLM, Path], tmp_path: Path
) -> None:
    model, verifier_dir = verifier
    upstream = _upstream_draft(verifier_dir, model.config, CASES[case])
    upstream.save_pretrained(tmp_path)
    ours = SpeculatorModel.from_pretrained(tmp_path)
    assert isinstance(ours, Eagle3DraftModel)
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        assert getattr(ours.config, flag) is bool(CASES[case].get(flag)), flag
    assert ours.windows == ({0: 5} if "layer_types" in CASES[case] else {})
    _assert_same_logits(ours, upstream, model)


@pytest.mark.parametrize("case", list(CASES))
def test_specops_checkpoint_loads_upstream_and_matches(
    case: str, verifier: tuple[LlamaForCausalLM, Path], tmp_path: Path
) -> None:
    from speculators import SpeculatorModel as UpstreamModel

    model, verifier_dir = verifier
    ours = _specops_draft(model, verifier_dir, CASES[case])
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Eagle3DraftModel"] and written["speculators_version"] == "0.9.0"
    theirs = UpstreamModel.from_pretrained(str(tmp_path)).eval()
    assert theirs.config.speculators_config.algorithm == "hass"
    assert theirs.config.draft_vocab_size == DRAFT_VOCAB and theirs.config.norm_before_residual is False
    state = theirs.state_dict()
    for name, tensor in ours.tensors_for_save().items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name
    _assert_same_logits(ours, theirs, model)
    reloaded = SpeculatorModel.from_pretrained(tmp_path)
    assert reloaded.config.speculators_dict() == ours.config.speculators_dict()


@pytest.mark.parametrize("case", ["norm_output", "norm_before_fc+norm_output"])
def test_proposals_follow_the_training_forward(case: str, verifier: tuple[LlamaForCausalLM, Path]) -> None:
    """`propose` (what evaluation drafts with) reads each chained step as forward_ttt does."""
    model, verifier_dir = verifier
    draft = _specops_draft(model, verifier_dir, CASES[case])
    ids, aux, _ = _inputs(model)
    n = 40  # prefix: aux for n positions, n + 1 tokens; longer than the sliding window
    proposal = draft.propose(ids[None, : n + 1], aux[None, :n], STEPS)[0]
    tokens = torch.cat([ids[: n + 1], proposal[:-1], torch.zeros(N - n - STEPS, dtype=torch.long)])
    padded = torch.cat([aux[:n], torch.zeros(N - n, *aux.shape[1:])])
    batch = DraftBatch(
        input_ids=tokens[None],
        aux_hidden=padded[None],
        last_hidden=torch.zeros(1, N, aux.shape[-1]),
        loss_mask=torch.ones(1, N, dtype=torch.bool),
        position_ids=torch.arange(N)[None],
        document_ids=torch.zeros(1, N, dtype=torch.long),
    )
    with torch.no_grad():
        steps = draft.forward_ttt(batch, STEPS)
    chained = draft.to_target_ids(torch.stack([logits[0, n - 1].argmax(-1) for logits in steps]))
    assert chained.tolist() == proposal.tolist()


def test_sliding_window_moves_with_each_drafted_position(
    verifier: tuple[LlamaForCausalLM, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At inference the window follows the drafted position, as in vLLM's KV cache: the chained
    query at position q sees context keys q - w + 1 .. (the last accepted position) n - 1."""
    model, verifier_dir = verifier
    draft = _specops_draft(model, verifier_dir, CASES["sliding"])  # layer 0 sliding (w = 5), layer 1 full
    seen: list[tuple[list[int], list[torch.Tensor]]] = []
    original = Eagle3DraftModel.layer_masks

    def spy(self: Eagle3DraftModel, allowed: torch.Tensor, queries: torch.Tensor) -> list[torch.Tensor]:
        masks = original(self, allowed, queries)
        seen.append((queries.tolist(), masks))
        return masks

    monkeypatch.setattr(Eagle3DraftModel, "layer_masks", spy)
    ids, aux, _ = _inputs(model)
    n = 40
    draft.propose(ids[None, : n + 1], aux[None, :n], STEPS)
    assert [queries for queries, _ in seen] == [list(range(n)), [n], [n + 1]]
    first, *chain = seen
    assert first[1][0][0, n - 1].nonzero().flatten().tolist() == list(range(n - 5, n))
    for (queries, (sliding, full)), q in zip(chain, (n, n + 1), strict=True):
        assert sliding[0, 0].nonzero().flatten().tolist() == list(range(q - 4, n)), queries
        assert full[0, 0].nonzero().flatten().tolist() == list(range(n))
    with pytest.raises(
        ValueError, match="sliding_window 5 of draft layers \\[0\\] cannot see the 6 positions"
    ):
        draft.propose(ids[None, : n + 1], aux[None, :n], 7)


def test_unknown_layer_type_is_refused(verifier: tuple[LlamaForCausalLM, Path], tmp_path: Path) -> None:
    model, verifier_dir = verifier
    _specops_draft(model, verifier_dir, SLIDING).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["transformer_layer_config"]["layer_types"] = ["chunked_attention", "full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorFormatError, match=r"layer_types: \['chunked_attention'\] not implemented"):
        SpeculatorModel.from_pretrained(tmp_path)
    config["transformer_layer_config"]["layer_types"] = ["full_attention", "full_attention"]
    config["fc_norm"] = config["norm_before_fc"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorFormatError, match="norm_before_fc and fc_norm exclude each other"):
        SpeculatorModel.from_pretrained(tmp_path)
