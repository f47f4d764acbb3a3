"""The pre-flight storage estimate: bytes per token from the capture, examples from the datasets."""

from __future__ import annotations

from typing import Any

import pytest
from _operator_support import ROOT

from specops.plan import MEAN_TOKENS_PER_EXAMPLE, human
from specops_operator.api import SpeculatorDataGenSpec, SpeculatorTraining, load_resources
from specops_operator.builders.training import inline_source
from specops_operator.estimate import estimate_storage, quantity_bytes
from specops_operator.validation import KNOWN_VERIFIERS, check_datagen, check_training

LLAMA_8B = KNOWN_VERIFIERS["meta-llama/llama-3.1-8b-instruct"]


def _flagship() -> SpeculatorTraining:
    training = load_resources((ROOT / "examples" / "eagle3-train.yaml").read_text())[0]
    assert isinstance(training, SpeculatorTraining)
    training.metadata.namespace = "ml"
    return training


def _spec(**changes: Any) -> SpeculatorDataGenSpec:
    spec = _flagship().spec.data_gen
    assert spec is not None
    return spec.model_copy(update=changes)


@pytest.mark.parametrize(
    ("value", "size"),
    [(2, 2), ("2Ti", 2 * 2**40), ("500Gi", 500 * 2**30), ("1.5T", 1_500_000_000_000), ("1e9", 10**9)],
)
def test_quantities(value: int | str, size: int) -> None:
    assert quantity_bytes(value) == size


def test_an_8b_verifier_with_four_slots_in_bf16_stores_32_kib_per_token() -> None:
    estimate = estimate_storage(_spec(), LLAMA_8B)
    assert estimate is not None
    assert estimate.bytes_per_token == 4 * 4096 * 2 + 5  # + int32 token id + uint8 loss mask
    assert estimate.examples == 207_865  # UltraChat train_sft, from the table
    assert estimate.tokens_per_example == MEAN_TOKENS_PER_EXAMPLE
    assert human(estimate.total_bytes) == "6.3Ti"


def test_the_factors_follow_the_spec() -> None:
    spec = _spec()
    spec.datasets[0].max_samples = 1000
    spec.processor.max_length = 512
    spec.states.hidden_states.layers = [2, 16]
    spec.engine.dtype = "float32"
    estimate = estimate_storage(spec, LLAMA_8B)
    assert estimate is not None
    assert (estimate.examples, estimate.tokens_per_example) == (1000, 512)
    assert estimate.bytes_per_token == 2 * 4096 * 4 + 5
    spec.datasets[0].max_samples, spec.datasets[0].split = None, "train_sft[:300]"
    assert estimate_storage(spec, LLAMA_8B).examples == 300  # type: ignore[union-attr]
    spec.datasets[0].split, spec.datasets[0].path = "train", "someone/unknown-chats"
    assert estimate_storage(spec, LLAMA_8B) is None  # unknown size: no guess, no stall


def test_the_flagship_run_on_its_old_2ti_claim_stalls_with_the_numbers() -> None:
    training = _flagship()
    assert training.spec.data_gen is not None and training.spec.data_gen.storage is not None
    findings, _ = check_datagen(training.spec.data_gen, field="spec.dataGen")
    assert findings == []  # the example asks for 8Ti
    training.spec.data_gen.storage.size = "2Ti"
    source = inline_source(training, None)
    findings, _ = check_training(training.spec, source)
    assert [f.reason for f in findings] == ["StorageTooSmall"]
    assert findings[0].message.startswith("spec.dataGen.storage.size 2Ti is smaller than the estimated ")
    assert (
        "207865 examples x 1024 tokens x 32773 B/token (4 layers x 4096 hidden x 2 B" in findings[0].message
    )
    assert findings[0].message.endswith("= 6.3Ti; raise the size or lower datasets[].maxSamples")


def test_existing_claims_and_online_runs_are_not_estimated() -> None:
    spec = _spec()
    assert spec.storage is not None
    spec.storage.size, spec.storage.existing_claim = None, "shards"
    assert check_datagen(spec, claim_found=True)[0] == []
    online = _spec(mode="online")
    assert online.storage is not None
    online.storage.size = "1Gi"
    assert check_datagen(online)[0] == []
