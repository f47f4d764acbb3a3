"""The whole loop on SmolLM2 with vLLM at both ends (CPU): vLLM answers the prompts (`regenerate`)
-> vLLM data generation -> SpecOps training -> vLLM serving the trained speculator
(`specops evaluate --engine vllm`).

vLLM must load the speculators-format checkpoint SpecOps writes and draft with it exactly as our
own evaluator does: its counters (drafts, accepted tokens, per position) must match ours on the
same prompts, and its greedy speculative output must equal the verifier's greedy decoding.
Measured on CPU fp32: identical counters (164 drafts, 25 accepted, acceptance length 1.152).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _vllm_child import ANSWER_TOKENS, SERVE_MAX_LEN, SMOLLM2
from _vllm_marks import NEEDS_VLLM_AND_SMOLLM2

pytestmark = NEEDS_VLLM_AND_SMOLLM2

CHILD = Path(__file__).with_name("_vllm_child.py")
CONVERSATIONS = 24
STEPS = 50
TOLERANCE = 0.1
"""Allowed gap between vLLM's and our figures (float kernels may flip a rare near-tie)."""


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("vllm-serve")
    proc = subprocess.run(
        [sys.executable, str(CHILD), "serve", str(out), str(CONVERSATIONS), str(STEPS)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "generate": json.loads((out / "generate.json").read_text()),
        "eval": json.loads((out / "eval.json").read_text()),
        "final": out / "draft" / "final",
        "answers": out / "data" / "regenerated" / "answers-0-of-1.jsonl",
    }


def test_vllm_generated_the_training_data(outcome: dict[str, Any]) -> None:
    report = outcome["generate"]
    assert report["ok"] and report["failed"] == 0
    assert report["written"] + report["dropped"] == CONVERSATIONS
    assert report["written"] >= CONVERSATIONS // 2
    assert report["written"] <= report["regenerated"] <= CONVERSATIONS and report["regenerated_tokens"] > 0


def test_vllm_answers_are_the_verifier_s_greedy_answers(outcome: dict[str, Any]) -> None:
    """Each regenerated answer equals the Transformers verifier's own greedy answer to its prompt."""
    import torch

    from specops.config import VerifierConfig
    from specops.data.chat import render
    from specops.data.records import Message
    from specops.evaluate import eos_ids, greedy_references
    from specops.verifier import load_model, load_tokenizer

    verifier = VerifierConfig(**SMOLLM2)
    model = load_model(verifier, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(verifier)
    eos = eos_ids(model)
    rows = [json.loads(line) for line in outcome["answers"].read_text().splitlines()]
    answered = [row for row in rows if row["messages"] and row["messages"][-1]["role"] == "assistant"]
    assert len(answered) >= CONVERSATIONS // 2
    conversations = [[Message(m["role"], m["content"]) for m in row["messages"]] for row in answered]
    prompts = [
        tokenizer(render(tokenizer, c[:-1], None, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for c in conversations
    ]
    # Greedy decoding is prefix-consistent: the 48-token answer cut to a prompt's room is its answer.
    references = greedy_references(model, prompts, ANSWER_TOKENS, batch_size=8)
    same = 0
    for row, conversation, prompt, full in zip(answered, conversations, prompts, references, strict=True):
        tokens = full[: SERVE_MAX_LEN - len(prompt)]
        ended = bool(tokens) and tokens[-1] in eos
        reference = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
        if conversation[-1].content == reference:
            same += 1
            assert row["open_final"] == (not ended), row["id"]
    # Float kernels differ between the engines: a rare near-tie may flip a token (and the rest).
    assert same >= len(answered) - 2, f"{same} of {len(answered)} answers equal"


def test_the_checkpoint_is_in_the_speculators_format(outcome: dict[str, Any]) -> None:
    config = json.loads((outcome["final"] / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3


def test_vllm_counters_match_our_evaluator(outcome: dict[str, Any]) -> None:
    assert outcome["generate"]["evaluate_exit"] == 0
    served, ours = outcome["eval"]["vllm"], outcome["eval"]["specops"]
    assert outcome["eval"]["engine"] == "vllm"
    assert served["prompts"] == ours["prompts"] >= 1
    assert served["speculative_tokens"] == ours["speculative_tokens"] == 3
    assert served["drafts"] > 0 and ours["lossless"]
    assert served["outputs_equal_greedy"] >= served["prompts"] - 1
    assert served["generated_tokens"] == ours["generated_tokens"]
    assert served["acceptance_length"] == pytest.approx(1 + served["accepted_tokens"] / served["drafts"])
    assert ours["acceptance_length"] > 1.0, "the briefly trained draft should accept some tokens"
    assert abs(served["acceptance_length"] - ours["acceptance_length"]) <= TOLERANCE
    positions = served["per_position"]
    assert positions == sorted(positions, reverse=True)  # chain drafts: j+1 accepted implies j
    assert positions == pytest.approx(ours["per_position"], abs=TOLERANCE)
