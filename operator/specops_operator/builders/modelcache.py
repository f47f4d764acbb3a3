"""`spec.modelCache` -> its children and what the reading pods mount.

A claim holds the verifier's Hub snapshot. One download Job (`specops fetch-verifier`, no GPU)
fills it; generators, trainer and evaluator mount it read-only at /models with
`$SPECOPS_MODEL_CACHE` set, so they resolve the verifier from it and never download. The stages
that read it are created only once the download succeeded (`ready`), so no GPU pod starts (or
pulls 16-140 GB by itself) before the weights are there.
"""

from __future__ import annotations

from dataclasses import dataclass

from specops.config import VerifierConfig
from specops.verifier import MODEL_CACHE_ENV
from specops_operator.api import DATAGEN_KIND, ModelCacheSpec, PodSettings, Resources
from specops_operator.builders import common
from specops_operator.builders.common import Defaults, Manifest, Owner, PodParts

MODELS_ROOT = "/model-cache"
HUB_CACHE = f"{MODELS_ROOT}/hub"
"""The Hugging Face Hub cache inside the claim (`models--org--name/{blobs,refs,snapshots}`)."""
FETCHER = "fetcher"
"""Component label of the download Job and its pod."""
FETCH_RESOURCES = Resources(requests={"cpu": "1", "memory": "1Gi"}, limits={"memory": "4Gi"})
"""A download streams to disk: one core and little memory, whatever the model's size."""


@dataclass(frozen=True)
class CacheNames:
    """Child names of the model cache of one resource (a DataGen, or a training reading `dataGenRef`);
    `base` differs per kind, so a DataGen and a training of the same name never share a child."""

    base: str

    @classmethod
    def of(cls, kind: str, name: str) -> CacheNames:
        return cls(f"{name}-{'gen' if kind == DATAGEN_KIND else 'train'}")

    @property
    def claim(self) -> str:
        return f"{self.base}-models"

    @property
    def job(self) -> str:
        return f"{self.base}-fetch"

    def claim_for(self, spec: ModelCacheSpec) -> str:
        return spec.existing_claim or self.claim


@dataclass(frozen=True)
class ModelCache:
    """A run's model cache as its readers need it: which claim, and whether it is filled."""

    claim: str
    ready: bool


def reader_parts(cache: ModelCache | None) -> tuple[list[Manifest], list[Manifest], list[Manifest]]:
    """(volumes, mounts, env) of a pod that loads the verifier: the claim read-only, and the env
    that makes `specops.verifier` resolve from it alone. Nothing without a model cache."""
    if cache is None:
        return [], [], []
    volume, mount = common.claim_volume("model-cache", cache.claim, MODELS_ROOT, read_only=True)
    return [volume], [mount], [{"name": MODEL_CACHE_ENV, "value": HUB_CACHE}]


def _fetch_pod(pod: PodSettings) -> PodSettings:
    """A helper pod with the readers' env (HF_TOKEN, HF_ENDPOINT): the download needs the network
    and the claim only, no GPU, and little scratch space (it writes into the claim)."""
    update = {"env": pod.env, "env_from": pod.env_from, "cache_size": "1Gi", "shm_size": "64Mi"}
    return common.support_pod(pod).model_copy(update=update)


def fetch_args(verifier: VerifierConfig) -> list[str]:
    args = ["specops", "fetch-verifier", "--verifier", verifier.name_or_path, "--cache-dir", HUB_CACHE]
    return [*args, "--revision", verifier.revision] if verifier.revision else args


def build_cache(
    owner: Owner,
    spec: ModelCacheSpec,
    verifier: VerifierConfig,
    pod: PodSettings,
    defaults: Defaults,
    *,
    suspend: bool,
    ttl: int | None,
) -> list[Manifest]:
    """The claim (unless it exists already) and the download Job that fills it."""
    names = CacheNames.of(owner.kind, owner.name)
    children: list[Manifest] = []
    if spec.size is not None:
        children.append(common.claim(owner, names.claim, "models", spec.size, spec))
    volume, mount = common.claim_volume("model-cache", names.claim_for(spec), MODELS_ROOT)
    parts = PodParts(
        component=FETCHER,
        args=fetch_args(verifier),
        env=[],
        volumes=[volume],
        mounts=[mount],
        resources=FETCH_RESOURCES,
    )
    children.append(
        common.job(
            owner,
            names.job,
            FETCHER,
            common.pod_template(owner, _fetch_pod(pod), defaults, parts),
            completions=1,
            parallelism=1,
            suspend=suspend,
            backoff={"backoffLimit": spec.backoff_limit},
            deadline=None,
            ttl=ttl,
        )
    )
    return children
