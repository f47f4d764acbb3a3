"""Chain speculative decoding: acceptance accounting, cache rollback, lossless check, prompts, CLI."""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from _models_support import VOCAB, build_verifier, new_draft
from _split_support import conversation_store, prompt_conversation, trained_conversations
from transformers import LlamaForCausalLM

from specops import evaluate as evaluate_module
from specops.commands import evaluate as evaluate_command
from specops.data.split import HeldOutSplit
from specops.eval_inputs import load_inputs
from specops.evaluate import (
    CachedVerifier,
    default_max_mismatch_rate,
    draft_cost_ratio,
    estimated_speedup,
    evaluate,
    greedy_decode,
    greedy_references,
    load_prompts,
    prompts_from_examples,
    speculative_decode,
)
from specops.models.eagle3 import Eagle3DraftModel
from specops.paths import PathNotAllowedError
from specops.stores.base import StoreMeta
from specops.stores.disk import DiskStore

PROMPTS = [[5, 17, 3, 44, 9], [60, 2, 71, 8, 8, 30, 12, 1, 90]]


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verifier")
    build_verifier(path, layers=6)
    return path


@pytest.fixture(scope="module")
def draft(verifier: LlamaForCausalLM, verifier_dir: Path) -> Eagle3DraftModel:
    return new_draft(verifier, verifier_dir).eval()


def _oracle(
    verifier: LlamaForCausalLM,
    draft: Eagle3DraftModel,
    monkeypatch: pytest.MonkeyPatch,
    corrupt_at: int | None,
) -> None:
    """Make the draft propose the verifier's own greedy continuation (optionally wrong at one position)."""

    def propose(
        input_ids: torch.Tensor, aux_hidden: torch.Tensor, num_tokens: int, context: object = None
    ) -> torch.Tensor:
        assert aux_hidden.shape[1] == input_ids.shape[1] - 1
        truth = greedy_decode(verifier, input_ids[0].tolist(), num_tokens, eos=set())
        if corrupt_at is not None:
            truth[corrupt_at] = (truth[corrupt_at] + 1) % VOCAB
        return torch.tensor([truth])

    monkeypatch.setattr(draft, "propose", propose)


def test_untrained_draft_is_lossless(verifier: LlamaForCausalLM, draft: Eagle3DraftModel) -> None:
    report = evaluate(verifier, draft, PROMPTS, max_new_tokens=12)
    assert report.lossless and report.mismatched_prompts == []
    assert report.prompts == 2 and report.speculative_tokens == 3
    assert report.drafts > 0 and 1.0 <= report.acceptance_length <= 4.0
    assert report.acceptance_length == pytest.approx(1 + report.accepted_tokens / report.drafts)
    assert len(report.per_position) == 3
    assert report.per_position == sorted(report.per_position, reverse=True)
    assert json.loads(json.dumps(report.to_dict()))["lossless"] is True


def test_perfect_draft_accepts_everything(
    verifier: LlamaForCausalLM, draft: Eagle3DraftModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _oracle(verifier, draft, monkeypatch, corrupt_at=None)
    report = evaluate(verifier, draft, PROMPTS, max_new_tokens=13)
    assert report.lossless
    assert report.acceptance_length == 4.0 and report.per_position == [1.0, 1.0, 1.0]
    out = speculative_decode(verifier, draft, PROMPTS[0], 13, 3, set())
    assert out.accepted == [3, 3, 3] and len(out.tokens) == 13


def test_partial_acceptance_rolls_the_cache_back(
    verifier: LlamaForCausalLM, draft: Eagle3DraftModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _oracle(verifier, draft, monkeypatch, corrupt_at=1)
    report = evaluate(verifier, draft, PROMPTS, max_new_tokens=11, k=3)
    assert report.lossless, "rejected tokens must leave no trace in the verifier cache"
    assert report.acceptance_length == 2.0 and report.per_position == [1.0, 0.0, 0.0]


def test_generation_stops_at_eos(verifier: LlamaForCausalLM, draft: Eagle3DraftModel) -> None:
    greedy = greedy_decode(verifier, PROMPTS[1], 10, eos=set())
    stop = greedy[3]
    first = greedy.index(stop)
    out = speculative_decode(verifier, draft, PROMPTS[1], 10, 3, {stop})
    assert out.tokens == greedy[: first + 1]
    assert greedy_decode(verifier, PROMPTS[1], 10, {stop}) == out.tokens


def test_mismatch_is_reported(
    verifier: LlamaForCausalLM, draft: Eagle3DraftModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "specops.evaluate.greedy_references", lambda model, prompts, *a: [[-1]] * len(prompts)
    )
    report = evaluate(verifier, draft, PROMPTS, max_new_tokens=4)
    assert not report.lossless and report.mismatched_prompts == [0, 1]


def test_cached_verifier_reject_masks_the_rejected_tokens(verifier: LlamaForCausalLM) -> None:
    runner = CachedVerifier(verifier, [1, 3])
    [(logits, aux)] = runner.extend([[1, 2, 3, 4]])
    assert logits.shape == (4, VOCAB) and aux.shape == (4, 2, 32)
    runner.reject(0, 2)
    assert runner.lengths == [2]
    [(again, _)] = runner.extend([[3, 4]])
    torch.testing.assert_close(again, logits[2:], rtol=1e-5, atol=1e-5)


def test_rows_of_a_batch_see_only_their_own_tokens(verifier: LlamaForCausalLM) -> None:
    """Ragged prompts, padding, an empty chunk and a rejection in one row: every row's logits
    equal that row run alone."""
    alone = []
    for prompt, follow in ((PROMPTS[0], [7, 7, 7]), (PROMPTS[1], [9])):
        single = CachedVerifier(verifier, [2])
        single.extend([prompt])
        alone.append(single.extend([follow])[0][0])
    batch = CachedVerifier(verifier, [2], rows=3)
    batch.extend([PROMPTS[0], PROMPTS[1], [4, 4]], last_logits_only=True)
    batch.extend([[7, 7, 7, 50], [9, 51], []])
    batch.reject(0, 1)
    batch.reject(1, 1)
    assert batch.lengths == [len(PROMPTS[0]) + 3, len(PROMPTS[1]) + 1, 2]
    first, second, third = batch.extend([[7], [8], [5]])
    reference = CachedVerifier(verifier, [2])
    reference.extend([[*PROMPTS[0], 7, 7, 7]])
    torch.testing.assert_close(first[0], reference.extend([[7]])[0][0], rtol=1e-4, atol=1e-4)
    reference = CachedVerifier(verifier, [2])
    reference.extend([[*PROMPTS[1], 9]])
    torch.testing.assert_close(second[0], reference.extend([[8]])[0][0], rtol=1e-4, atol=1e-4)
    reference = CachedVerifier(verifier, [2])
    reference.extend([[4, 4]])
    torch.testing.assert_close(third[0], reference.extend([[5]])[0][0], rtol=1e-4, atol=1e-4)
    assert alone[0].shape == (3, VOCAB) and alone[1].shape == (1, VOCAB)


def test_batch_size_does_not_change_the_results(verifier: LlamaForCausalLM, draft: Eagle3DraftModel) -> None:
    prompts = [*PROMPTS, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [11]]
    one = evaluate(verifier, draft, prompts, max_new_tokens=12, batch_size=1)
    three = evaluate(verifier, draft, prompts, max_new_tokens=12, batch_size=3)
    assert one.lossless and three.lossless
    assert (one.drafts, one.accepted_tokens, one.per_position) == (
        three.drafts,
        three.accepted_tokens,
        three.per_position,
    )
    assert greedy_references(verifier, prompts, 12, batch_size=4) == [
        greedy_decode(verifier, p, 12, set()) for p in prompts
    ]
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(verifier, draft, prompts, batch_size=0)


def test_bad_evaluate_inputs(verifier: LlamaForCausalLM, draft: Eagle3DraftModel) -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate(verifier, draft, [])
    with pytest.raises(ValueError, match="empty prompt"):
        evaluate(verifier, draft, [[]])


def test_prompts_from_a_disk_store_and_files(tmp_path: Path) -> None:
    meta = StoreMeta(
        verifier="v", layer_ids=(1, 2, 3, 4), num_layers=4, hidden_size=8, vocab_size=VOCAB, dtype="float32"
    )
    with DiskStore(tmp_path / "store", meta=meta, allowed_roots=[tmp_path]) as store:
        store.write(
            [
                {
                    "id": f"d/{i}/0",
                    "token_ids": torch.arange(6, dtype=torch.int32) + i,
                    "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.uint8),
                    "hidden_states": torch.zeros(6, 4, 8),
                }
                for i in range(3)
            ]
        )
        store.finalize()
    found = load_prompts(tmp_path / "store", allowed_roots=[tmp_path], limit=2)
    assert len(found.prompts) == 2 and all(len(p) == 3 for p in found.prompts)
    assert found.source["split"] is None and found.source["held_out"] is None, "a store taken as given"
    assert sorted(map(tuple, load_prompts(tmp_path / "store", allowed_roots=[tmp_path]).prompts)) == [
        (0, 1, 2),
        (1, 2, 3),
        (2, 3, 4),
    ]
    assert prompts_from_examples([[1, 2], [3, 4]], [[1, 1], [0, 1]]) == [[3]], "no prompt -> skipped"

    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt_ids": [4, 5]}\n\n{"prompt_ids": [6]}\n')
    assert load_prompts(rows, allowed_roots=[tmp_path]).prompts == [[4, 5], [6]]
    with pytest.raises(ValueError, match="a held-out split applies to a DiskStore"):
        load_prompts(rows, allowed_roots=[tmp_path], split=HeldOutSplit(0.1))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt_ids": []}]))
    with pytest.raises(ValueError, match="row 0: prompt_ids"):
        load_prompts(bad, allowed_roots=[tmp_path])
    bad.write_text(json.dumps([{"prompt": "hello"}]))
    with pytest.raises(ValueError, match="need the verifier tokenizer"):
        load_prompts(bad, allowed_roots=[tmp_path])
    bad.write_text(json.dumps({"question": 1}))
    with pytest.raises(ValueError, match="expected"):
        load_prompts(bad, allowed_roots=[tmp_path])
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(bad, allowed_roots=[tmp_path])
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl", allowed_roots=[tmp_path])
    with pytest.raises(PathNotAllowedError):
        load_prompts(rows, allowed_roots=[tmp_path / "elsewhere"])


def test_text_prompts_use_the_chat_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "user:", "assistant:", "hello", "there", "hi"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = tmp_path / "chat.jsonl"
    rows.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}
        )
        + "\n"
        + json.dumps({"prompt": "hi"})
        + "\n"
    )
    assert load_prompts(rows, get_tokenizer=lambda: tokenizer, allowed_roots=[tmp_path]).prompts == [
        [1, 3, 4, 2],
        [1, 5, 2],
    ]


def cli_main(argv: list[str]) -> int:
    """`specops evaluate ...` through the command module (the dispatcher also loads other commands)."""
    parser = argparse.ArgumentParser(prog="specops evaluate")
    evaluate_command.register(parser)
    return evaluate_command.main(parser.parse_args(argv[1:]))


def test_cli_evaluate(
    verifier_dir: Path,
    draft: Eagle3DraftModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draft.save_pretrained(tmp_path / "spec")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    roots = ["--allowed-root", str(tmp_path), "--allowed-root", str(verifier_dir)]
    args = ["evaluate", "--speculator", str(tmp_path / "spec"), "--data", str(tmp_path / "prompts.jsonl")]
    code = cli_main([*args, "--max-new-tokens", "6", "--output", str(tmp_path / "r.json"), *roots])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["lossless"] is True and printed["prompts"] == 2
    assert json.loads((tmp_path / "r.json").read_text()) == printed

    assert cli_main([*args, "--max-mismatch-rate", "1.5", *roots]) == 2
    assert "--max-mismatch-rate must be in [0, 1]" in capsys.readouterr().err
    # The verdict follows the tolerance: one of two prompts off the references fails 0, passes 0.5.
    real = evaluate_module.greedy_references

    def one_off(*a: Any, **k: Any) -> list[list[int]]:
        refs = real(*a, **k)
        return [refs[0], [*refs[1][:-1], refs[1][-1] + 1]]

    monkeypatch.setattr(evaluate_module, "greedy_references", one_off)
    assert cli_main([*args, "--max-new-tokens", "6", *roots]) == 4
    assert "50% of the prompts (allowed: 0%" in capsys.readouterr().err
    assert cli_main([*args, "--max-new-tokens", "6", "--max-mismatch-rate", "0.5", *roots]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["mismatch_rate"] == 0.5 and printed["passed"] and not printed["lossless"]
    monkeypatch.undo()

    assert cli_main([*args, "--max-new-tokens", "0", *roots]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert cli_main([*args, "--batch-size", "0", *roots]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    broken = ["evaluate", "--speculator", str(tmp_path / "broken"), "--data", str(tmp_path / "prompts.jsonl")]
    assert cli_main([*broken, *roots]) == 2
    assert "speculators_model_type is missing" in capsys.readouterr().err


def test_cli_with_text_prompts_on_the_tiny_verifier(
    tiny_verifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Chat-templated text prompts through the verifier's own tokenizer, EOS from its config."""
    from transformers import AutoConfig

    from specops.models.vocab import build_vocab_mapping

    config = AutoConfig.from_pretrained(tiny_verifier_dir)
    t2d, d2t = build_vocab_mapping({}, config.vocab_size, 256)
    Eagle3DraftModel.from_training_args(
        config, t2d, d2t, verifier_name_or_path=str(tiny_verifier_dir)
    ).save_pretrained(tmp_path / "spec")
    rows = [
        {"prompt": "What is the capital of France?"},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["evaluate", "--speculator", str(tmp_path / "spec"), "--data", str(tmp_path / "prompts.jsonl")]
    roots = ["--allowed-root", str(tmp_path), "--allowed-root", str(tiny_verifier_dir)]
    assert cli_main([*argv, "--max-new-tokens", "16", *roots]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["lossless"] and report["prompts"] == 2 and report["generated_tokens"] > 0


def test_shared_references_match_recomputed_ones(verifier: LlamaForCausalLM, draft: Eagle3DraftModel) -> None:
    references = greedy_references(verifier, PROMPTS, 12)
    shared = evaluate(verifier, draft, PROMPTS, max_new_tokens=12, references=references)
    assert (
        shared.lossless
        and shared.accepted_tokens == evaluate(verifier, draft, PROMPTS, max_new_tokens=12).accepted_tokens
    )
    wrong = [[*r[:-1], r[-1] + 1] for r in references]
    assert evaluate(verifier, draft, PROMPTS, max_new_tokens=12, references=wrong).mismatched_prompts == list(
        range(len(PROMPTS))
    )
    with pytest.raises(ValueError, match="1 references for"):
        evaluate(verifier, draft, PROMPTS, references=references[:1])


def test_evaluation_logs_its_progress_prompt_by_prompt(
    verifier: LlamaForCausalLM,
    draft: Eagle3DraftModel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prompts = [*PROMPTS, [7, 7, 1], [33, 4]]
    caplog.set_level(logging.INFO, logger="specops.evaluate")
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY", 0.0)  # a line on every decoding step
    report = evaluate(verifier, draft, prompts, max_new_tokens=12, label="trained draft", batch_size=3)
    lines = [r.getMessage() for r in caplog.records]
    mine = [line for line in lines if line.startswith("evaluate trained draft: prompt ")]
    done = [int(line.split("prompt ")[1].split("/")[0]) for line in mine]
    assert done == sorted(done) and done[-1] == len(prompts) and len(mine) > len(prompts)
    assert f"prompt 4/4 done, {report.generated_tokens}/48 tokens (" in mine[-1] and "prompts/s)" in mine[-1]
    assert any(line.startswith("verifier greedy references: prompt 4/4 done, ") for line in lines)

    caplog.clear()
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY", 1e9)  # throttled: only the last prompt's line
    evaluate(verifier, draft, prompts, max_new_tokens=12, references=greedy_references(verifier, prompts, 12))
    progress = [r.getMessage() for r in caplog.records if "prompt " in r.getMessage()]
    assert [line.split(",")[0] for line in progress] == [
        "verifier greedy references: prompt 4/4 done",
        "evaluate draft: prompt 4/4 done",
    ]


def test_draft_cost_counts_the_weights_each_step_reads(
    verifier: LlamaForCausalLM, draft: Eagle3DraftModel
) -> None:
    """A tied head reads the embedding table once; an untied one reads its own copy and the
    embedding is only looked up: the verifier reads as much per token either way."""
    untied, tied = copy.deepcopy(verifier), copy.deepcopy(verifier)
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    tied.lm_head.weight = tied.model.embed_tokens.weight
    embedding = verifier.model.embed_tokens.weight.numel()
    draft_reads = sum(p.numel() for p in draft.parameters()) - draft.embed_tokens.weight.numel()
    expected = draft_reads / (sum(p.numel() for p in untied.parameters()) - embedding)
    assert draft_cost_ratio(untied, draft) == pytest.approx(expected)
    assert draft_cost_ratio(tied, draft) == pytest.approx(expected)
    assert estimated_speedup(2.0, 3, 0.1) == pytest.approx(2.0 / 1.3)


def test_cli_evaluates_the_conversations_its_training_held_out(
    verifier_dir: Path, draft: Eagle3DraftModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--train-config` (the operator's evaluation Job): the training's data and split, nothing it trained on."""
    draft.save_pretrained(tmp_path / "spec")
    store = conversation_store(tmp_path / "data")
    config = {
        "verifier": {"name_or_path": str(verifier_dir)},
        "data": {"path": str(store), "validationFraction": 0.25},
        "seed": 3,
        "outputDir": str(tmp_path / "train"),
        "allowedRoots": [str(tmp_path)],
    }
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    roots = ["--allowed-root", str(tmp_path), "--allowed-root", str(verifier_dir)]
    argv = ["--speculator", str(tmp_path / "spec"), "--train-config", str(tmp_path / "train.yaml"), *roots]
    parser = argparse.ArgumentParser(prog="specops evaluate")
    evaluate_command.register(parser)
    inputs = load_inputs(parser.parse_args([*argv, "--max-prompts", "1000"]))
    evaluated = {prompt_conversation(p) for p in inputs.prompts}
    assert evaluated and not evaluated & trained_conversations(store, 0.25, 3)

    assert cli_main(["evaluate", *argv, "--max-prompts", "4", "--max-new-tokens", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    source = printed["source"]
    assert (
        source["split"] == {"by": "conversation", "fraction": 0.25, "seed": 3} and source["held_out"] is True
    )
    assert source["prompts"] == printed["prompts"] == 4 and 1 <= source["conversations"] <= 4
    with pytest.raises(SystemExit, match="2"):
        cli_main(["evaluate", *argv, "--data", str(store)])
    assert "--data: not allowed with argument --train-config" in capsys.readouterr().err
    config["data"]["validationFraction"] = 0.0
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    assert cli_main(["evaluate", *argv]) == 2
    assert "validationFraction is 0" in capsys.readouterr().err


def test_reduced_precision_compares_the_mismatch_rate_with_a_threshold(
    verifier: LlamaForCausalLM, draft: Eagle3DraftModel
) -> None:
    assert default_max_mismatch_rate(torch.float32) == 0.0
    assert default_max_mismatch_rate(torch.bfloat16) == default_max_mismatch_rate(torch.float16) == 0.5
    references = greedy_references(verifier, PROMPTS, 8)
    one_off = [references[0], [*references[1][:-1], references[1][-1] + 1]]
    exact = evaluate(verifier, draft, PROMPTS, max_new_tokens=8, references=one_off)
    assert exact.mismatch_rate == 0.5 and exact.max_mismatch_rate == 0.0 and not exact.passed
    assert exact.mismatched_prompts == [1] and exact.first_mismatch == [len(references[1]) - 1]
    assert not exact.to_dict()["passed"] and "50% of the prompts" in exact.mismatch_message()
    tolerant = evaluate(verifier, draft, PROMPTS, max_new_tokens=8, references=one_off, max_mismatch_rate=0.5)
    assert tolerant.passed and not tolerant.lossless, "lossless stays the exact truth"
    assert evaluate(verifier, draft, PROMPTS, max_new_tokens=8, references=references).passed
    with pytest.raises(ValueError, match="max_mismatch_rate"):
        evaluate(verifier, draft, PROMPTS, references=references, max_mismatch_rate=1.5)
    half = copy.deepcopy(verifier).to(torch.bfloat16)
    report = evaluate(half, draft.to(torch.bfloat16), PROMPTS[:1], max_new_tokens=4)
    draft.to(torch.float32)
    assert report.max_mismatch_rate == 0.5, "bf16 gets the documented tolerance by default"
