"""The upload Job of `spec.export`: `specops push` of the exported speculator to its Hub repository
or object-store prefix, once it is trained (and evaluated, so the model card carries the measured
acceptance).

Least privilege: the credentials (the Hub token, the AWS keys) are environment variables from the
user's Secret in this pod only (no trainer, evaluator or generator pod sees them), the operator
itself never reads that Secret, and the pod mounts the output claim read-only. Its report line
(`url`, `commit`) reaches `status.artifact` through the termination message like every other.
"""

from __future__ import annotations

from specops_operator.api import ExportSpec, PodSettings, Resources
from specops_operator.builders import common
from specops_operator.builders.common import Defaults, Manifest, Owner, PodParts

PUBLISHER = "publisher"
UPLOAD_RESOURCES = Resources(requests={"cpu": "500m", "memory": "1Gi"})
"""An upload streams files: no GPU, little memory."""
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL = ("AWS_SESSION_TOKEN",)


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
    suspend: bool,
    deadline: int | None,
    ttl: int | None,
) -> Manifest:
    """The upload Job: the output claim read-only, the credentials, `specops push`. A refused token
    or a missing bucket (exit 2) fails at once; a network failure is retried twice."""
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
    return common.job(
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
