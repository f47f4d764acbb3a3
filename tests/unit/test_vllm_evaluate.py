"""`specops evaluate --engine vllm` without starting vLLM: counters -> figures, CLI dispatch and its
errors. The run against real vLLM is tests/pipeline/test_vllm_serve.py."""

from __future__ import annotations

import argparse
import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest

from specops.commands import evaluate as evaluate_command
from specops.engines import vllm as vllm_engine
from specops.evaluate_vllm import ACCEPTED, DRAFTS, PER_POSITION, acceptance, counter_totals


def metric(name: str, value: Any = None, values: list[int] | None = None) -> Any:
    return SimpleNamespace(name=name, value=value, values=values)


def test_counters_sum_over_engines_and_ignore_other_metrics() -> None:
    metrics = [
        metric(DRAFTS, 10),
        metric(DRAFTS, 5),
        metric(ACCEPTED, 7),
        metric(PER_POSITION, values=[4, 2, 1, 0]),
        metric(PER_POSITION, values=[1, 0, 0, 0]),
        metric("vllm:num_requests_running", 3),
    ]
    assert counter_totals(metrics, 3) == (15, 7, [5, 2, 1])
    assert counter_totals([], 2) == (0, 0, [0, 0])


def test_acceptance_is_the_difference_of_two_snapshots() -> None:
    report = acceptance(
        (4, 2, [2, 0, 0]),
        (24, 32, [16, 10, 4]),
        prompts=2,
        k=3,
        generated=52,
        outputs_equal_greedy=2,
        seconds=1.23456,
    )
    assert report.drafts == 20 and report.accepted_tokens == 30
    assert report.acceptance_length == pytest.approx(2.5)
    assert report.per_position == pytest.approx([0.7, 0.5, 0.2])
    assert report.seconds == 1.235
    empty = acceptance(
        (0, 0, [0]), (0, 0, [0]), prompts=1, k=1, generated=0, outputs_equal_greedy=1, seconds=0
    )
    assert empty.acceptance_length == 1.0 and empty.per_position == [0.0]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser)
    return parser.parse_args(list(argv))


def test_engine_flag_defaults_to_transformers_and_rejects_others() -> None:
    assert parse("--speculator", "s", "--data", "d").engine == "transformers"
    with pytest.raises(SystemExit):
        parse("--speculator", "s", "--data", "d", "--engine", "tgi")


def test_engine_vllm_without_vllm_exits_2_naming_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        vllm_engine.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    code = evaluate_command.main(parse("--speculator", "s", "--data", "d", "--engine", "vllm"))
    assert code == 2
    assert "--engine: 'vllm' needs vLLM" in capsys.readouterr().err


def test_engine_vllm_checks_the_speculator_path_first(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda field="": None)
    args = parse("--speculator", str(tmp_path / "none"), "--data", "d", "--engine", "vllm")
    args.allowed_root = [str(tmp_path)]
    assert evaluate_command.main(args) == 2
    assert "none" in capsys.readouterr().err


def test_engine_vllm_refuses_a_draft_vllm_cannot_serve_before_serving(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A verifier mixing sliding and full attention with a 2-layer draft: exit 2 naming why, vLLM never started."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from specops import evaluate_vllm
    from specops.models.eagle3 import Eagle3DraftModel
    from specops.models.vocab import build_vocab_mapping

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=8,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "verifier")
    t2d, d2t = build_vocab_mapping({i: 64 - i for i in range(64)}, 64, 32)
    draft = Eagle3DraftModel.from_training_args(
        config, t2d, d2t, verifier_name_or_path=str(tmp_path / "verifier"), num_layers=2
    )
    draft.save_pretrained(tmp_path / "spec")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_ids": [1, 2, 3]}) + "\n")
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda field="": None)
    monkeypatch.setattr(evaluate_vllm, "serve", lambda *a, **k: pytest.fail("vLLM was started"))
    args = parse(
        "--speculator", str(tmp_path / "spec"), "--data", str(tmp_path / "prompts.jsonl"), "--engine", "vllm"
    )
    args.allowed_root = [str(tmp_path)]
    assert evaluate_command.main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bars
    assert last.startswith(
        "specops evaluate: error: --engine vllm: vLLM cannot serve a draft of 2 layers for"
    )
