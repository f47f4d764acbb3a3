"""Names, labels, owner references and the hardened workload pod every child shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from specops import exitcodes
from specops_operator import PREFIX
from specops_operator.api import PodSettings, Resources, SpeculatorDataGen, SpeculatorTraining, StorageSpec

Manifest = dict[str, Any]

DEFAULT_IMAGE = "ghcr.io/specops/workload:0.1.0"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KIND_LABEL = f"{PREFIX}/kind"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CONTAINER = "workload"
"""Name of the one workload container in every pod (status reads its termination message)."""

CONFIG_DIR = "/etc/specops"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
DATA_ROOT = "/data"
SHARDS_DIR = f"{DATA_ROOT}/shards"
OUTPUT_ROOT = "/output"
CACHE_ROOT = "/cache"
ALLOWED_ROOTS = [DATA_ROOT, OUTPUT_ROOT, CACHE_ROOT]
"""Local paths a workload may touch: its volumes; everything else is rejected by the CLI."""


def pod_roots(pod: PodSettings) -> list[str]:
    """The operator's own roots plus where the user mounted `pod.volumes` (local weights, datasets):
    a path the user mounted is one they meant the workload to read."""
    return [*ALLOWED_ROOTS, *(m.mount_path.rstrip("/") for m in pod.volume_mounts)]


METRICS_PORT = 9400
"""Live progress metrics of trainer and generator pods (container port `metrics`; local rank or
local worker r serves METRICS_PORT + r). Every pod gets one config: the container's args bind
the endpoint to the pod's own IP (`METRICS_ARGS`, `POD_IP_ENV`), reachable by the operator and
by Prometheus (the chart's PodMonitor) but by no other interface of the node."""
METRICS_ARGS = ("--metrics.host", "$(POD_IP)")
POD_IP_ENV: Manifest = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
METRICS_CONTAINER_PORT: Manifest = {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}

REPORT_WRAPPER = ["python", "-m", "specops_operator.report", "--"]
"""Runs the CLI as a child and copies its JSON report line into the termination message."""


@dataclass(frozen=True)
class Defaults:
    """Operator-wide settings the CRs do not carry (from the operator's environment / Helm values)."""

    image: str = DEFAULT_IMAGE
    """Workload image used when a CR names none."""
    metrics_from: tuple[Manifest, ...] = ()
    """NetworkPolicy peers admitted to a stream broker's metrics port (where Prometheus runs);
    none: the port is closed to every other pod."""


@dataclass(frozen=True)
class Owner:
    """The custom resource children belong to."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str
    labels: dict[str, str]

    @classmethod
    def of(cls, cr: SpeculatorDataGen | SpeculatorTraining) -> Owner:
        meta = cr.metadata
        if not meta.namespace or not meta.uid:
            raise ValueError(f"{cr.kind} {meta.name!r}: metadata.namespace and metadata.uid are required")
        return cls(cr.api_version, cr.kind, meta.name, meta.namespace, meta.uid, dict(meta.labels))

    @property
    def queue(self) -> str | None:
        """Kueue LocalQueue named on the CR; Jobs then start suspended and Kueue admits them."""
        return self.labels.get(KUEUE_QUEUE_LABEL)

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    """Labels that select one component's objects and pods (stable: part of Service selectors)."""
    return {INSTANCE_LABEL: owner.name, COMPONENT_LABEL: component, KIND_LABEL: owner.kind}


def label_selector(labels: dict[str, str]) -> str:
    """`{a: 1, b: 2}` -> `a=1,b=2` (the labelSelector query and scale-subresource form)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def labels(owner: Owner, component: str, *, queue: bool = False) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "specops",
        "app.kubernetes.io/part-of": "specops",
        "app.kubernetes.io/managed-by": "specops-operator",
        **selector_labels(owner, component),
    }
    if queue and owner.queue:
        out[KUEUE_QUEUE_LABEL] = owner.queue
    return out


def metadata(owner: Owner, name: str, component: str, *, owned: bool = True, queue: bool = False) -> Manifest:
    """Child metadata; `owned=False` leaves out the ownerReference (retained PVCs outlive the CR)."""
    meta: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component, queue=queue),
    }
    if owned:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def quantity(value: int | str) -> str:
    return str(value)


def resources(spec: Resources) -> Manifest:
    out: Manifest = {}
    if spec.requests:
        out["requests"] = {k: quantity(v) for k, v in sorted(spec.requests.items())}
    if spec.limits:
        out["limits"] = {k: quantity(v) for k, v in sorted(spec.limits.items())}
    return out


def index_env(name: str) -> Manifest:
    """An env var holding the Job completion index (the downward API; also set by Kubernetes >= 1.22)."""
    return {
        "name": name,
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
    }


def _dump(items: Sequence[BaseModel], *, exclude_defaults: bool = False) -> list[Manifest]:
    """Spec models as the pod spec writes them (camelCase, unset fields left out)."""
    return [
        item.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=exclude_defaults)
        for item in items
    ]


BASE_ENV: list[Manifest] = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": CACHE_ROOT},
    {"name": "HF_HOME", "value": f"{CACHE_ROOT}/huggingface"},
    {"name": "SPECOPS_CACHE", "value": f"{CACHE_ROOT}/specops"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]


def container_security(pod: PodSettings) -> Manifest:
    """No privilege escalation, read-only root, every capability dropped (IPC_LOCK back only on request)."""
    capabilities: Manifest = {"drop": ["ALL"]}
    if pod.ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": capabilities,
    }


def pod_security(pod: PodSettings) -> Manifest:
    """Non-root ids (the spec's, default 1000) and a volume chown only when a volume's root needs it."""
    return {
        "runAsNonRoot": True,
        "runAsUser": pod.run_as_user,
        "runAsGroup": pod.run_as_group,
        "fsGroup": pod.fs_group,
        "fsGroupChangePolicy": pod.fs_group_change_policy,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_volumes(pod: PodSettings) -> tuple[list[Manifest], list[Manifest]]:
    """Writable places under a read-only root: /tmp, the model cache, a memory-backed /dev/shm."""
    volumes = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": quantity(pod.cache_size)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity(pod.shm_size)}},
    ]
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_ROOT},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def config_volume(config_map: str) -> tuple[Manifest, Manifest]:
    return (
        {"name": "config", "configMap": {"name": config_map}},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
    )


def claim_volume(name: str, claim: str, path: str, *, read_only: bool = False) -> tuple[Manifest, Manifest]:
    """`readOnly` only when true: the API server drops a false one, so the stored child would differ."""
    source: Manifest = {"claimName": claim}
    mount: Manifest = {"name": name, "mountPath": path}
    if read_only:
        source["readOnly"] = mount["readOnly"] = True
    return {"name": name, "persistentVolumeClaim": source}, mount


def support_pod(pod: PodSettings) -> PodSettings:
    """A helper pod's settings (broker, model download): the workload pods' image, pull settings and
    ids, but none of their (GPU) resources, scheduling, env or extra volumes."""
    return PodSettings(
        image=pod.image,
        image_pull_policy=pod.image_pull_policy,
        image_pull_secrets=pod.image_pull_secrets,
        service_account_name=pod.service_account_name,
        priority_class_name=pod.priority_class_name,
        run_as_user=pod.run_as_user,
        run_as_group=pod.run_as_group,
        fs_group=pod.fs_group,
        fs_group_change_policy=pod.fs_group_change_policy,
    )


@dataclass(frozen=True)
class PodParts:
    """What differs between workload pods; the rest is `pod_template`'s hardened default."""

    component: str
    args: list[str]
    env: list[Manifest]
    volumes: list[Manifest]
    mounts: list[Manifest]
    resources: Resources
    report: bool = True
    ports: tuple[Manifest, ...] = ()
    subdomain: str | None = None
    restart_policy: str = "Never"
    readiness: Manifest | None = None
    labels: dict[str, str] = field(default_factory=dict)
    """Extra pod labels (a stream's pods carry its name and their role)."""


def pod_template(owner: Owner, pod: PodSettings, defaults: Defaults, parts: PodParts) -> Manifest:
    """A non-root, read-only-root, no-API-token pod running one workload container."""
    scratch, scratch_mounts = scratch_volumes(pod)
    container: Manifest = {
        "name": CONTAINER,
        "image": pod.image or defaults.image,
        "imagePullPolicy": pod.image_pull_policy,
        "command": [*REPORT_WRAPPER, *parts.args] if parts.report else list(parts.args),
        "env": [*parts.env, *BASE_ENV, *_dump(pod.env)],
        "resources": resources(parts.resources),
        "securityContext": container_security(pod),
        "volumeMounts": [*parts.mounts, *scratch_mounts, *_dump(pod.volume_mounts, exclude_defaults=True)],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if pod.env_from:
        container["envFrom"] = _dump(pod.env_from)
    if parts.ports:
        container["ports"] = list(parts.ports)
    if parts.readiness:
        container["readinessProbe"] = parts.readiness
    spec: Manifest = {
        "restartPolicy": parts.restart_policy,
        "automountServiceAccountToken": pod.service_account_name is not None,
        "enableServiceLinks": False,
        "securityContext": pod_security(pod),
        "containers": [container],
        "volumes": [*parts.volumes, *scratch, *pod.volumes],
    }
    if parts.subdomain:
        spec["subdomain"] = parts.subdomain
    if pod.termination_grace_period_seconds is not None:  # 0 is a value
        spec["terminationGracePeriodSeconds"] = pod.termination_grace_period_seconds
    optional: dict[str, Any] = {
        "serviceAccountName": pod.service_account_name,
        "priorityClassName": pod.priority_class_name,
        "nodeSelector": dict(pod.node_selector) or None,
        "tolerations": _dump(pod.tolerations),
        "affinity": pod.affinity,
        "imagePullSecrets": [{"name": s.name} for s in pod.image_pull_secrets] or None,
        "schedulerName": pod.scheduler_name,
        "topologySpreadConstraints": pod.topology_spread_constraints,
    }
    spec.update({k: v for k, v in optional.items() if v})
    template_meta: Manifest = {"labels": {**parts.labels, **labels(owner, parts.component)}}
    if pod.annotations:
        template_meta["annotations"] = dict(pod.annotations)
    return {"metadata": template_meta, "spec": spec}


def config_map(owner: Owner, name: str, text: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, name, "config"),
        "data": {"config.yaml": text},
    }


def claim(owner: Owner, name: str, component: str, size: int | str, storage: StorageSpec) -> Manifest:
    """A PVC; retained claims carry no ownerReference, so deleting the CR keeps the data."""
    spec: Manifest = {
        "accessModes": list(storage.access_modes),
        "resources": {"requests": {"storage": quantity(size)}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(owner, name, component, owned=not storage.retain),
        "spec": spec,
    }


def failure_policy(*, ignore_disruptions: bool = True) -> Manifest:
    """Exit codes no retry can change (`specops.exitcodes.FATAL`: config, data, evaluation verdict)
    fail the Job at once; crashes (1) and SIGTERM (143) are retried. `ignore_disruptions`: an
    evicted pod is replaced without counting; off for a torchrun group, where a replaced rank
    cannot rejoin the others and the whole group must go (the operator restarts it)."""
    rules: list[Manifest] = [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": CONTAINER,
                "operator": "In",
                "values": list(exitcodes.FATAL),
            },
        },
    ]
    if ignore_disruptions:
        rules.append(
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        )
    return {"rules": rules}


def job(
    owner: Owner,
    name: str,
    component: str,
    template: Manifest,
    *,
    completions: int,
    parallelism: int,
    suspend: bool,
    backoff: Manifest,
    deadline: int | None,
    ttl: int | None,
    policy: Manifest | None = None,
) -> Manifest:
    """An Indexed Job; with a Kueue queue it always starts suspended (Kueue resumes it on admission).
    `policy`: its podFailurePolicy (default `failure_policy()`)."""
    spec: Manifest = {
        "completionMode": "Indexed",
        "completions": completions,
        "parallelism": parallelism,
        **backoff,
        "podFailurePolicy": policy or failure_policy(),
        "suspend": suspend or owner.queue is not None,
        "template": template,
    }
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(owner, name, component, queue=True),
        "spec": spec,
    }
