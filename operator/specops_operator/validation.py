"""Checks that need no cluster and no GPU, run before any child exists (`VerifierCompatible`).

A failed check leaves the resource Stalled with a reason and a message that names the field;
nothing is created, so no GPU is ever requested for a run that cannot work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from specops.config import VerifierConfig
from specops.engines.base import default_layer_ids
from specops.paths import PACKAGE_PREFIX
from specops.plan import KNOWN_SHAPES, human, known_shape
from specops.verifier import HUB_ID_PATTERN
from specops_operator.api import (
    ModelCacheSpec,
    PodSettings,
    SpeculatorDataGenSpec,
    SpeculatorTrainingSpec,
    VerifierArchitecture,
)
from specops_operator.builders.common import pod_roots
from specops_operator.builders.training import DataSource, procs_per_node
from specops_operator.estimate import estimate_storage, quantity_bytes, verifier_bytes

KNOWN_VERIFIERS: dict[str, VerifierArchitecture] = {
    name: VerifierArchitecture(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, vocab_size=shape.vocab_size
    )
    for name, shape in KNOWN_SHAPES.items()
}
"""`specops.plan.KNOWN_SHAPES` as API models: typical specs are checked with no extra input;
anything else is checked when the spec gives `verifierArchitecture`."""


FINDING_REASONS = frozenset(
    {
        "LayerOutOfRange",
        "NotEnoughGPUs",
        "StorageNotFound",
        "VerifierMismatch",
        "HiddenSizeMismatch",
        "DraftVocabTooLarge",
        "StorageTooSmall",
        "PathNotAllowed",
    }
)
"""Every reason a Finding may carry."""


@dataclass(frozen=True)
class Finding:
    """One reason the spec cannot run."""

    reason: str
    message: str

    def __post_init__(self) -> None:
        if self.reason not in FINDING_REASONS:
            raise ValueError(f"undeclared finding reason {self.reason!r} (add it to FINDING_REASONS)")


def architecture(verifier: VerifierConfig, given: VerifierArchitecture | None) -> VerifierArchitecture | None:
    """The spec's own dimensions, else a known verifier's (matched by id or by directory/file name)."""
    if given is not None:
        return given
    shape = known_shape(verifier)
    return None if shape is None else KNOWN_VERIFIERS[shape.source]


def _storage(claim: str | None, claim_found: bool | None, field: str) -> list[Finding]:
    if claim and claim_found is False:
        return [Finding("StorageNotFound", f"{field}: PersistentVolumeClaim {claim!r} does not exist")]
    return []


def _storage_size(spec: SpeculatorDataGenSpec, arch: VerifierArchitecture, field: str) -> list[Finding]:
    """A new offline data claim smaller than the estimated hidden states would fill up mid-run."""
    size = spec.storage.size if spec.storage is not None and spec.mode == "offline" else None
    estimate = estimate_storage(spec, arch) if size is not None else None
    if size is None or estimate is None or estimate.total_bytes <= quantity_bytes(size):
        return []
    return [
        Finding(
            "StorageTooSmall",
            f"{field}.storage.size {size} is smaller than the estimated {estimate.describe()}; "
            "raise the size or lower datasets[].maxSamples",
        )
    ]


def _cache_size(cache: ModelCacheSpec | None, verifier: VerifierConfig, field: str) -> list[Finding]:
    """A new model cache claim smaller than the verifier's Hub weights would fail the download."""
    needed = verifier_bytes(verifier) if cache is not None and cache.size is not None else None
    if cache is None or cache.size is None or needed is None or needed <= quantity_bytes(cache.size):
        return []
    return [
        Finding(
            "StorageTooSmall",
            f"{field}.modelCache.size {cache.size} is smaller than {verifier.name_or_path}'s weights "
            f"and tokenizer ({human(needed)} in bf16 safetensors); raise the size",
        )
    ]


def check_datagen(
    spec: SpeculatorDataGenSpec, claim_found: bool | None = None, field: str = "spec"
) -> tuple[list[Finding], VerifierArchitecture | None]:
    """Findings for a data generation spec, and the architecture they were checked against."""
    findings: list[Finding] = []
    arch = architecture(spec.verifier, spec.verifier_architecture)
    layers = spec.states.hidden_states.layers
    if arch is not None:
        wanted = layers or default_layer_ids(arch.num_layers)
        bad = [k for k in wanted if k > arch.num_layers]
        if bad:
            findings.append(
                Finding(
                    "LayerOutOfRange",
                    f"{field}.states.hiddenStates.layers: {bad} exceed the verifier's {arch.num_layers} layers "
                    f"(allowed 0..{arch.num_layers})",
                )
            )
        findings += _storage_size(spec, arch, field)
    gpus = spec.pod.resources.gpus()
    engine = spec.engine
    needed = engine.tensor_parallel_size * (engine.data_parallel_size if engine.kind == "vllm" else 1)
    if needed > 1 and gpus < needed:
        findings.append(
            Finding(
                "NotEnoughGPUs",
                f"{field}.engine: tensorParallelSize x dataParallelSize = {needed} GPUs per worker, but "
                f"{field}.pod.resources.limits['nvidia.com/gpu'] is {gpus}",
            )
        )
    if spec.storage is not None:
        findings += _storage(spec.storage.existing_claim, claim_found, f"{field}.storage.existingClaim")
    findings += _pod_paths(spec, field)
    findings += _cache_size(spec.model_cache, spec.verifier, field)
    return findings, arch


def _in_pod(path: str, roots: list[str]) -> bool:
    """Whether a workload pod may read `path`: under its roots, or data shipped in a package."""
    return path.startswith(PACKAGE_PREFIX) or any(path == r or path.startswith(r + "/") for r in roots)


def _pod_paths(spec: SpeculatorDataGenSpec, field: str) -> list[Finding]:
    """Local paths the pods would refuse at start (the CRD already refuses `..`): the models take
    any path, as `specops run --local` reads host files, but a pod reads only its own volumes."""
    named = [(f"{field}.datasets[{i}].path", d.path) for i, d in enumerate(spec.datasets) if d.kind != "hf"]
    if spec.regenerate is not None and spec.regenerate.path is not None:
        named.append((f"{field}.regenerate.path", spec.regenerate.path))
    verifier = _model_path(f"{field}.verifier.nameOrPath", spec.verifier.name_or_path, spec.pod, field)
    return _outside_pod(named, spec.pod, field) + verifier


def _model_path(name: str, value: str | None, pod: PodSettings, field: str) -> list[Finding]:
    """A local model directory (verifier weights on a mounted claim, a `draft.initFrom`) the pods
    could not read; a Hub id is downloaded by the pods, `package:` paths ship in the image."""
    if value is None or re.match(HUB_ID_PATTERN, value) is not None:
        return []
    return _outside_pod([(name, value)], pod, field)


def _outside_pod(named: list[tuple[str, str]], pod: PodSettings, field: str) -> list[Finding]:
    roots = pod_roots(pod)
    return [
        Finding(
            "PathNotAllowed",
            f"{name}: {path!r} is outside the pods' volumes ({', '.join(roots)}); put the file there, mount "
            f"it with {field}.pod.volumes and {field}.pod.volumeMounts, or use package:NAME/path",
        )
        for name, path in named
        if not _in_pod(path, roots)
    ]


def check_training(
    spec: SpeculatorTrainingSpec, data: DataSource, claim_found: bool | None = None
) -> tuple[list[Finding], VerifierArchitecture | None]:
    """Findings for a training spec against the data it reads."""
    findings: list[Finding] = []
    verifier = spec.verifier or data.spec.verifier
    if verifier.name_or_path != data.spec.verifier.name_or_path:
        findings.append(
            Finding(
                "VerifierMismatch",
                f"spec.verifier.nameOrPath {verifier.name_or_path!r} differs from the verifier "
                f"{data.spec.verifier.name_or_path!r} that generated {data.names.name!r}",
            )
        )
    arch = architecture(verifier, spec.verifier_architecture)
    data_arch = architecture(data.spec.verifier, data.spec.verifier_architecture)
    if arch is not None and data_arch is not None and arch.hidden_size != data_arch.hidden_size:
        findings.append(
            Finding(
                "HiddenSizeMismatch",
                f"the training verifier's hidden size {arch.hidden_size} differs from the data's {data_arch.hidden_size}",
            )
        )
    if arch is not None and spec.draft.draft_vocab_size > arch.vocab_size:
        findings.append(
            Finding(
                "DraftVocabTooLarge",
                f"spec.draft.draftVocabSize {spec.draft.draft_vocab_size} exceeds the verifier vocabulary "
                f"({arch.vocab_size})",
            )
        )
    gpus = spec.pod.resources.gpus()
    if gpus and procs_per_node(spec) > gpus:
        findings.append(
            Finding(
                "NotEnoughGPUs",
                f"spec.procsPerNode {procs_per_node(spec)} exceeds spec.pod.resources.limits['nvidia.com/gpu'] ({gpus})",
            )
        )
    if spec.data_gen is not None:
        inline, _ = check_datagen(spec.data_gen, field="spec.dataGen")
        findings += inline
    findings += _storage(spec.storage.existing_claim, claim_found, "spec.storage.existingClaim")
    findings += _cache_size(spec.model_cache, verifier, "spec")
    findings += _model_path("spec.verifier.nameOrPath", verifier.name_or_path, spec.pod, "spec")
    findings += _model_path("spec.draft.initFrom", spec.draft.init_from, spec.pod, "spec")
    return findings, arch
