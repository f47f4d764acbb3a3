"""The example CRs against the generated CRDs (schema + CEL) and the api models, plus a table of
bad CRs that both the API server's rules and the pydantic models must reject with one message."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from _operator_support import ROOT, server_errors

from specops.config import ConfigError
from specops_operator.api import (
    SpeculatorTraining,
    immutable_changes,
    immutable_message,
    load_resources,
    parse_resource,
)

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples" / "local").glob("*.yaml"))
Doc = dict[str, Any]


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _example(name: str, index: int = 0) -> Doc:
    return copy.deepcopy(_docs(ROOT / "examples" / name)[index])


def test_the_required_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"eagle3-train.yaml", "datagen-offline.yaml", "datagen-online.yaml", "hass-train.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_passes_the_server_and_the_models(path: Path) -> None:
    for doc in _docs(path):
        assert server_errors(doc) == [], doc["metadata"]["name"]
    resources = load_resources(path.read_text(), str(path))
    assert resources


def test_eagle3_example_is_the_documented_run() -> None:
    cr = parse_resource(_example("eagle3-train.yaml"))
    assert isinstance(cr, SpeculatorTraining)
    spec = cr.spec
    assert (
        spec.data_gen is not None
        and spec.data_gen.verifier.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    )
    assert "ultrachat" in spec.data_gen.datasets[0].path
    assert spec.data_gen.workers == 4 and spec.data_gen.pod.resources.gpus() == 1
    assert spec.nodes * spec.pod.resources.gpus() == 8


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def apply(doc: Doc) -> None:
        node = doc
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value

    return apply


_DELETE = object()

# (example, doc index, change, message both the CEL rule and the pydantic rule give)
CROSS_FIELD = [
    (
        "hass-train.yaml",
        0,
        _set("spec.dataGen", _example("datagen-offline.yaml")["spec"]),
        "exactly one of dataGenRef or dataGen",
    ),
    ("hass-train.yaml", 0, _set("spec.dataGenRef", _DELETE), "exactly one of dataGenRef or dataGen"),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.dataGen.mode", "online"),
        "spec.maxSteps is required when spec.dataGen.mode is online",
    ),
    ("datagen-offline.yaml", 0, _set("spec.storage", _DELETE), "spec.storage is required for mode offline"),
    ("datagen-offline.yaml", 0, _set("spec.workers", 9), "spec.workers must be <= spec.shards"),
    ("datagen-offline.yaml", 0, _set("spec.datasets", [{"kind": "hf"}]), "path is required unless"),
    (
        "datagen-online.yaml",
        0,
        _set("spec.broker.metricsPort", 5555),  # passed everything, then crash-looped the broker
        "broker.port and broker.metricsPort must differ",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("spec.storage.existingClaim", "shared"),
        "exactly one of size (a new claim) or existingClaim",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("spec.storage.size", _DELETE),
        "exactly one of size (a new claim) or existingClaim",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set(
            "spec.pod.env",
            [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        ),
        "set value or valueFrom, not both",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.pod.env", [{"name": "A", "valueFrom": {}}]),
        "valueFrom needs exactly one of secretKeyRef or configMapKeyRef",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("metadata.name", "x" * 41),
        "metadata.name must be at most 40 characters",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("spec.storage.accessModes", ["ReadWriteOnce"]),
        "spec.storage.accessModes must include ReadWriteMany when spec.workers > 1",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.storage.accessModes", ["ReadWriteOncePod"]),
        "spec.storage.accessModes must include ReadWriteMany when spec.nodes > 1",
    ),
    (
        "eagle3-train.yaml",
        0,
        lambda doc: (
            _set("spec.nodes", 2)(doc),
            _set("spec.storage.accessModes", ["ReadWriteMany"])(doc),
            _set("spec.dataGen.workers", 1)(doc),
            _set("spec.dataGen.storage.accessModes", ["ReadWriteOnce"])(doc),
        ),
        "spec.dataGen.storage.accessModes must include ReadWriteMany when spec.nodes > 1",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.pod.volumeMounts", [{"name": "weights", "mountPath": "/models"}]),
        "pod.volumeMounts: every name must be a volume in pod.volumes",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.pod.volumes", [{"name": "cache", "emptyDir": {}}]),
        "pod.volumes: the names config, data, output, state, tmp, cache, dshm, model-cache, stream-keys are the operator's own",
    ),
    (
        "datagen-online.yaml",
        0,
        _set("spec.pod.volumes", [{"name": "stream-keys", "emptyDir": {}}]),
        "pod.volumes: the names config, data, output, state, tmp, cache, dshm, model-cache, stream-keys are the operator's own",
    ),
    (
        "hass-train.yaml",
        0,
        lambda doc: (
            _set("spec.pod.volumes", [{"name": "weights", "emptyDir": {}}])(doc),
            _set("spec.pod.volumeMounts", [{"name": "weights", "mountPath": "/output"}])(doc),
        ),
        "pod.volumeMounts: the paths /etc/specops, /data, /output, /state, /tmp, /cache, /dev/shm, "
        "/model-cache, /var/run/specops/stream-keys",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.pod.envFrom", [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]),
        "envFrom needs exactly one of secretRef or configMapRef",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.export", {"hub": {"repo": "acme/d"}, "uri": "s3://drafts/d"}),
        "spec.export needs exactly one of hub or uri",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.export", {"hub": {"repo": "acme/d"}, "endpointUrl": "http://minio:9000"}),
        "spec.export.endpointUrl needs spec.export.uri",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.export", {"hub": {"repo": "acme/d"}, "credentialsSecret": {"name": "s3"}}),
        "spec.export.credentialsSecret needs spec.export.uri",
    ),
    # Paths that climb out (`..`) failed only inside the pod; absolute ones outside the pods'
    # volumes are the operator's PathNotAllowed (test_operator_validation), as local runs take them.
    (
        "datagen-offline.yaml",
        0,
        _set("spec.datasets", [{"kind": "local", "path": "../../etc/passwd"}]),
        "spec.datasets[].path must not contain '..'",
    ),
    (
        "datagen-offline.yaml",  # 2 workers
        0,
        _set("spec.modelCache", {"size": "40Gi", "accessModes": ["ReadWriteOnce"]}),
        "spec.modelCache.accessModes must include ReadWriteMany or ReadOnlyMany when spec.workers > 1",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("spec.modelCache", {"size": "40Gi", "accessModes": ["ReadOnlyMany"]}),
        "modelCache.accessModes: a new claim needs a writable mode",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("spec.modelCache", {"size": "40Gi", "existingClaim": "models"}),
        "exactly one of size (a new claim) or existingClaim",
    ),
    (
        "datagen-offline.yaml",
        0,
        lambda doc: (
            _set("spec.modelCache", {"existingClaim": "models"})(doc),
            _set("spec.verifier.nameOrPath", "/weights/qwen3-8b")(doc),
        ),
        "spec.modelCache holds Hub models only: spec.verifier.nameOrPath must be a Hub id",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.dataGen.datasets", [{"kind": "text", "path": "/data/../etc"}]),
        "spec.datasets[].path must not contain '..'",
    ),
    (
        "datagen-offline.yaml",
        0,
        _set("spec.regenerate", {"path": "/data/answers/../../etc"}),
        "spec.regenerate.path must not contain '..'",
    ),
    # The rendered DataGenConfig's own rules: they used to fail only when the operator rendered it.
    (
        "datagen-offline.yaml",
        0,
        _set("spec.sync.claimRanges", 4),
        "spec.sync.claimRanges needs spec.mode online",
    ),
    (
        "datagen-online.yaml",
        0,
        lambda doc: (
            _set("spec.sync.claimRanges", 4)(doc),
            _set("spec.regenerate", {"path": "/cache/answers"})(doc),
        ),
        "spec.regenerate is not supported with spec.sync.claimRanges",
    ),
    (
        "datagen-online.yaml",
        0,
        _set("spec.regenerate", {}),
        "spec.regenerate.path is required for mode online",
    ),
    (
        "eagle3-train.yaml",
        0,
        _set("spec.dataGen.modelCache", {"size": "40Gi"}),
        "spec.dataGen.modelCache: set spec.modelCache instead",
    ),
    (
        "eagle3-train.yaml",  # 4 generator pods read it at once
        0,
        _set("spec.modelCache", {"size": "40Gi", "accessModes": ["ReadWriteOnce"]}),
        "spec.modelCache.accessModes must include ReadWriteMany or ReadOnlyMany when several pods read it",
    ),
    (
        "eagle3-train.yaml",
        0,
        lambda doc: (
            _set("spec.modelCache", {"size": "40Gi"})(doc),
            _set("spec.dataGen.verifier.ggufFile", "model.Q4.gguf")(doc),
        ),
        "spec.modelCache holds Hub models only: spec.dataGen.verifier.nameOrPath must be a Hub id",
    ),
    (
        "hass-train.yaml",
        0,
        lambda doc: (
            _set("spec.modelCache", {"size": "40Gi"})(doc),
            _set("spec.verifier", {"nameOrPath": "./weights"})(doc),
        ),
        "spec.modelCache holds Hub models only: spec.verifier.nameOrPath must be a Hub id",
    ),
    (
        "hass-train.yaml",
        0,
        lambda doc: (
            _set("spec.draft.initFrom", "acme/qwen3-8b-eagle3")(doc),
            _set("spec.draft.initFromVerifier", True)(doc),
        ),
        "initFromVerifier both set the starting weights; use one",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.draft.initFrom", "/output/../etc/drafts"),
        "spec.draft.initFrom must not contain '..'",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.draft.initFromRevision", "v1"),
        "draft.initFromRevision is the Hub revision of",
    ),
    (
        "hass-train.yaml",
        0,
        lambda doc: (_set("spec.draft.normBeforeFc", True)(doc), _set("spec.draft.fcNorm", True)(doc)),
        "draft.fcNorm exclude each other",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.draft.layerTypes", ["full_attention", "full_attention"]),
        "draft.layerTypes needs one entry per draft layer",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.draft.layerTypes", ["sliding_attention"]),
        "draft.layerTypes has a sliding_attention layer",
    ),
    (
        "hass-train.yaml",
        0,
        _set("spec.draft.slidingWindow", 128),
        "draft.slidingWindow is required exactly when",
    ),
    (
        "hass-train.yaml",
        0,
        lambda doc: (
            _set("spec.draft.numLayers", 2)(doc),
            _set("spec.draft.layerTypes", ["full_attention", "sliding_attention"])(doc),
            _set("spec.draft.slidingWindow", 128)(doc),
        ),
        "draft.layerTypes mixes full_attention and sliding_attention",
    ),
    (
        "hass-train.yaml",  # speculativeTokens 4
        0,
        lambda doc: (
            _set("spec.draft.layerTypes", ["sliding_attention"])(doc),
            _set("spec.draft.slidingWindow", 2)(doc),
        ),
        "draft.speculativeTokens - 1 positions drafted before the last one",
    ),
]


@pytest.mark.parametrize(
    ("example", "index", "change", "message"), CROSS_FIELD, ids=[c[3][:40] for c in CROSS_FIELD]
)
def test_cross_field_rules_agree(
    example: str, index: int, change: Callable[[Doc], None], message: str
) -> None:
    doc = _example(example, index)
    change(doc)
    assert any(message in err for err in server_errors(doc)), server_errors(doc)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_resource(doc)


# (example, change, a fragment of the schema error, a fragment of the pydantic error)
SCHEMA = [
    (
        "datagen-offline.yaml",
        _set("spec.shards", 0),
        "less than the minimum",
        "spec.shards: Input should be greater than or equal to 1",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.engine.kind", "tgi"),
        "is not one of",
        "spec.engine.kind: Input should be 'transformers' or 'vllm'",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.gpus", 4),
        "unknown field .spec.gpus",
        "spec.gpus: Extra inputs are not permitted",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.pod.resources.limits.memory", "lots"),
        "does not match",
        "spec.pod.resources.limits.memory",
    ),
    (
        "hass-train.yaml",
        _set("spec.pod.shmSize", -5),  # the CRD's integer branch had no minimum
        "less than the minimum",
        "spec.pod.shmSize: Input should be greater than or equal to 0",  # no union tag in the path
    ),
    ("hass-train.yaml", _set("spec.draft.algorithm", "medusa"), "is not one of", "spec.draft.algorithm"),
    (
        "hass-train.yaml",
        _set("spec.storage", _DELETE),
        "'storage' is a required property",
        "spec.storage: Field required",
    ),
    ("hass-train.yaml", _set("spec.dataGenRef.name", "Not_A_Name"), "does not match", "spec.dataGenRef.name"),
    (
        "hass-train.yaml",
        _set("spec.reportTo", ["mlflow", "wandb", "mlflow"]),
        'Duplicate value: "mlflow"',
        "spec.reportTo: Value error, lists mlflow more than once",
    ),
    # Bounds the CRD lacked (crdgen dropped tuple items' bounds) or pydantic lacked (int64, lengths).
    (
        "hass-train.yaml",
        _set("spec.optim.betas", [2, -1]),
        "greater than or equal to the maximum",
        "spec.optim.betas[0]: Input should be less than 1",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.engine.seed", 2**70),
        "beyond int64",
        "spec.engine.seed: Value error, 1180591620717411303424 does not fit in 64 bits",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.pod.resources.limits.memory", 10**30),
        "beyond int64",
        "spec.pod.resources.limits.memory: Input should be less than or equal to 9223372036854775807",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.pod.resources.limits.memory", 1e30),
        "is not valid under any of the given schemas",
        "spec.pod.resources.limits.memory",
    ),
    (
        "datagen-offline.yaml",
        _set("spec.engine.device", "cuda:" + "0" * 20),
        "is too long",
        "spec.engine.device: String should have at most 16 characters",
    ),
    (
        "hass-train.yaml",
        _set("spec.trainer.maxRestarts", 101),
        "greater than the maximum",
        "spec.trainer.maxRestarts: Input should be less than or equal to 100",
    ),
    (
        "hass-train.yaml",
        _set("spec.trainer.rendezvousTimeoutSeconds", 5),
        "less than the minimum",
        "spec.trainer.rendezvousTimeoutSeconds: Input should be greater than or equal to 60",
    ),
    (
        "hass-train.yaml",
        _set("spec.backoffLimit", 3),  # replaced by trainer.maxRestarts (group restarts)
        "unknown field .spec.backoffLimit",
        "spec.backoffLimit: Extra inputs are not permitted",
    ),
]


@pytest.mark.parametrize(
    ("example", "change", "schema_message", "model_message"), SCHEMA, ids=[c[3][:40] for c in SCHEMA]
)
def test_schema_rules_agree(
    example: str, change: Callable[[Doc], None], schema_message: str, model_message: str
) -> None:
    doc = _example(example)
    change(doc)
    assert any(schema_message in err for err in server_errors(doc)), server_errors(doc)
    with pytest.raises(ConfigError, match=re.escape(model_message)):
        parse_resource(doc)


IMMUTABLE = [
    ("datagen-offline.yaml", _set("spec.verifier.nameOrPath", "Qwen/Qwen3-14B"), "verifier"),
    ("datagen-offline.yaml", _set("spec.shards", 16), "shards"),
    ("datagen-offline.yaml", _set("spec.chatTemplate", "{{ messages }}"), "chatTemplate"),
    ("hass-train.yaml", _set("spec.draft.speculativeTokens", 5), "draft"),
    ("hass-train.yaml", _set("spec.nodes", 4), "nodes"),
    ("eagle3-train.yaml", _set("spec.dataGen.workers", 2), "dataGen"),
]


@pytest.mark.parametrize(("example", "change", "field"), IMMUTABLE, ids=[c[2] for c in IMMUTABLE])
def test_immutable_fields_are_rejected_by_both(
    example: str, change: Callable[[Doc], None], field: str
) -> None:
    old = _example(example)
    new = copy.deepcopy(old)
    change(new)
    message = immutable_message(field)
    assert message in server_errors(new, old)
    assert message in immutable_changes(old["spec"], new["spec"], old["kind"])


MUTABLE = [
    ("datagen-offline.yaml", _set("spec.workers", 8)),
    ("datagen-offline.yaml", _set("spec.suspend", True)),
    ("datagen-offline.yaml", _set("spec.ttlSecondsAfterFinished", 600)),
    ("hass-train.yaml", _set("spec.suspend", True)),
    ("hass-train.yaml", _set("spec.activeDeadlineSeconds", 86400)),
    ("hass-train.yaml", _set("spec.trainer.maxRestarts", 10)),  # applies from the next attempt
    ("hass-train.yaml", _set("spec.export", {"hub": {"repo": "acme/draft"}})),  # uploads (again)
]


@pytest.mark.parametrize(("example", "change"), MUTABLE)
def test_mutable_fields_may_change(example: str, change: Callable[[Doc], None]) -> None:
    old = _example(example)
    new = copy.deepcopy(old)
    change(new)
    assert server_errors(new, old) == []
    assert immutable_changes(old["spec"], new["spec"], old["kind"]) == []


def test_a_model_cache_several_nodes_read_may_be_read_only_many_beside_a_writable_mode() -> None:
    """ReadWriteOnce + ReadOnlyMany: the download Job writes it on one node, then the readers (all
    mounting it read-only) attach it on many, as the attach/detach controller allows."""
    doc = _example("datagen-offline.yaml")  # 2 workers
    doc["spec"]["modelCache"] = {"size": "40Gi", "accessModes": ["ReadWriteOnce", "ReadOnlyMany"]}
    assert server_errors(doc) == []
    cr = parse_resource(doc)
    assert cr.spec.model_cache is not None and cr.spec.model_cache.shared()
