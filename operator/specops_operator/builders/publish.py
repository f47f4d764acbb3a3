"""The upload Job of `spec.export`: `specops push` of the exported speculator to its Hub repository
or object-store prefix, once it is trained (and evaluated, so the model card carries the measured
acceptance).

Least privilege: the credentials (the Hub token, the AWS keys) are environment variables from the
user's Secret in this pod only (no trainer, evaluator or generator pod sees them), the operator
itself never reads that Secret, and the pod mounts the output claim read-only. Its report line
(`url`, `commit`) reaches `status.artifact` through the termination message like every other.

`spec.export` may change: the Job records what it was rendered from (a hash of the export and the
CR's `specops.dev/retry-upload` value, `UploadKey`), so the operator sees when it is stale
(`specops_operator.uploads`) although a Job's pod template cannot change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from specops_operator import PREFIX
from specops_operator.api import ExportSpec, PodSettings, Resources
from specops_operator.builders import common
from specops_operator.builders.common import Defaults, Manifest, Owner, PodParts

PUBLISHER = "publisher"
UPLOAD_RESOURCES = Resources(requests={"cpu": "500m", "memory": "1Gi"})
"""An upload streams files: no GPU, little memory."""
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL = ("AWS_SESSION_TOKEN",)
EXPORT_HASH_ANNOTATION = f"{PREFIX}/export-hash"
"""On the upload Job: a hash of the `spec.export` it was rendered from."""
RETRY_ANNOTATION = f"{PREFIX}/retry-upload"
"""On the CR: a new value asks for another upload with the same export (a fixed Secret); on the
upload Job: the value it was made for."""


MAX_RETRY = 63


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UploadKey:
    """What an upload Job was made for: the export (hashed) and the retry request."""

    export_hash: str
    retry: str = ""

    @classmethod
    def of(cls, export: ExportSpec, annotations: dict[str, str]) -> UploadKey:
        """The key of `export` as the CR asks for it now (defaults filled: equal exports hash equal)."""
        text = json.dumps(export.model_dump(mode="json", by_alias=True), sort_keys=True)
        retry = annotations.get(RETRY_ANNOTATION, "")
        if len(retry) > MAX_RETRY:  # recorded in status and on the Job: kept short
            retry = f"sha256:{_digest(retry)}"
        return cls(_digest(text), retry)

    @classmethod
    def from_annotations(cls, annotations: dict[str, Any]) -> UploadKey | None:
        """The key an upload Job records (None for one made before keys were recorded)."""
        if not annotations.get(EXPORT_HASH_ANNOTATION):
            return None
        return cls(str(annotations[EXPORT_HASH_ANNOTATION]), str(annotations.get(RETRY_ANNOTATION) or ""))

    @classmethod
    def from_status(cls, record: dict[str, Any] | None) -> UploadKey | None:
        """The key `status.upload` records (None when none is)."""
        if not record or not record.get("exportHash"):
            return None
        return cls(str(record["exportHash"]), str(record.get("retry") or ""))

    def annotations(self) -> dict[str, str]:
        out = {EXPORT_HASH_ANNOTATION: self.export_hash}
        return out | ({RETRY_ANNOTATION: self.retry} if self.retry else {})

    def status(self) -> dict[str, str]:
        """As `status.upload`."""
        return {"exportHash": self.export_hash} | ({"retry": self.retry} if self.retry else {})


def push_args(export: ExportSpec, speculator: str, evaluation: str | None) -> list[str]:
    """`specops push` for the target `export` names; `evaluation`: the evaluator's report file."""
    args = ["specops", "push", speculator]
    if export.hub is not None:
        args += ["--repo", export.hub.repo]
        if export.hub.private:
            args.append("--private")
        if export.hub.revision:
            args += ["--revision", export.hub.revision]
    else:
        assert export.uri is not None  # the CR rules require one of the two
        args += ["--to", export.uri]
        if export.endpoint_url:
            args += ["--endpoint-url", export.endpoint_url]
    if evaluation is not None:
        args += ["--eval-report", evaluation]
    return [*args, "--allowed-root", common.OUTPUT_ROOT]


def credentials_env(export: ExportSpec) -> list[Manifest]:
    """The upload credentials as env from the named Secret (nothing when none is named)."""
    if export.hub is not None and export.hub.token_secret is not None:
        ref = export.hub.token_secret.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}]
    if export.credentials_secret is None:
        return []
    secret = export.credentials_secret.name
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, **extra}}}
        for keys, extra in ((S3_KEYS, {}), (S3_OPTIONAL, {"optional": True}))
        for key in keys
    ]


def _upload_pod(pod: PodSettings, credentials: list[Manifest]) -> PodSettings:
    """A helper pod with the workload pods' env (HF_ENDPOINT, proxies) except the variables the
    export's own Secret sets: those come from that Secret alone."""
    ours = {c["name"] for c in credentials}
    env = [e for e in pod.env if e.name not in ours]
    return common.support_pod(pod).model_copy(update={"env": env, "env_from": pod.env_from})


def publish_job(
    owner: Owner,
    name: str,
    claim: str,
    export: ExportSpec,
    pod: PodSettings,
    defaults: Defaults,
    *,
    speculator: str,
    evaluation: str | None,
    key: UploadKey,
    suspend: bool,
    deadline: int | None,
    ttl: int | None,
) -> Manifest:
    """The upload Job: the output claim read-only, the credentials, `specops push`, annotated with
    `key`. A refused token or a missing bucket (exit 2) fails at once; a network failure is
    retried twice."""
    volume, mount = common.claim_volume("output", claim, common.OUTPUT_ROOT, read_only=True)
    credentials = credentials_env(export)
    parts = PodParts(
        component=PUBLISHER,
        args=push_args(export, speculator, evaluation),
        env=credentials,
        volumes=[volume],
        mounts=[mount],
        resources=export.resources or UPLOAD_RESOURCES,
    )
    job = common.job(
        owner,
        name,
        PUBLISHER,
        common.pod_template(owner, _upload_pod(pod, credentials), defaults, parts),
        completions=1,
        parallelism=1,
        suspend=suspend,
        backoff={"backoffLimit": 2},
        deadline=deadline,
        ttl=ttl,
    )
    job["metadata"]["annotations"] = key.annotations()
    return job
