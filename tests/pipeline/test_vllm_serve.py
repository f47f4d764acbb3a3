"""The whole loop on SmolLM2 with vLLM at both ends (CPU): vLLM data generation -> SpecOps training
-> vLLM serving the trained speculator (`specops evaluate --engine vllm`).

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
    }


def test_vllm_generated_the_training_data(outcome: dict[str, Any]) -> None:
    report = outcome["generate"]
    assert report["ok"] and report["failed"] == 0
    assert report["written"] + report["dropped"] == CONVERSATIONS
    assert report["written"] >= CONVERSATIONS // 2


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
