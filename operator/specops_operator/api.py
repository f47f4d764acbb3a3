"""The custom resources `SpeculatorDataGen` and `SpeculatorTraining` as pydantic models.

One source of truth: these models generate the CRD schemas (`crdgen`), validate CRs in the
operator and in `specops run`, and their workload parts are the `specops.config`
contracts the pods parse. Workload fields are *derived* from `DataGenConfig` / `TrainConfig`
(minus what the operator decides: paths, URLs, slices), so a field added there appears in the
CRD without a copy here. Pure: imports pydantic, `specops.config` and `specops.verifier`'s Hub id
pattern only.

Cross-field rules are declared once as `Rule`s: the API server enforces them as CEL
`x-kubernetes-validations`, pydantic enforces the same rule (for servers without CEL and for
local runs); tests check both agree on every bad example.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic.alias_generators import to_snake
from typing_extensions import TypedDict

from specops.config import (
    DRAFT_RULES,
    ConfigError,
    Contract,
    DataGenConfig,
    DatasetSource,
    DraftConfig,
    EngineConfig,
    ExportConfig,
    HubTarget,
    ProcessorConfig,
    RegenerateConfig,
    StatesConfig,
    SyncConfig,
    TrainConfig,
    TrainDataConfig,
    VerifierConfig,
    format_validation_error,
)
from specops.verifier import HUB_ID_PATTERN

DATAGEN_KIND = "SpeculatorDataGen"
TRAINING_KIND = "SpeculatorTraining"
MAX_NAME_LENGTH = 40
"""Children append suffixes (`-data-broker-0` is the longest chain) and Kubernetes caps names
used as label values at 63 characters."""

QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"

INT64_MAX = 2**63 - 1
"""The API server stores integers as int64; the models refuse larger ones too."""

Quantity = Annotated[
    Annotated[int, Field(ge=0, le=INT64_MAX)]
    | Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)],
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "maxLength": 64,
            # The integer branch; int64 is the server's own limit (a `maximum` of 2**63 - 1 would
            # be read as a float and overflow there). pattern and maxLength apply to strings only.
            "minimum": 0,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity: an integer or a string such as `16Gi` or `500m`."""

DNSName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
LabelKey = Annotated[str, Field(min_length=1, max_length=317)]
LabelValue = Annotated[str, Field(max_length=63)]

FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


class _NamedVolume(TypedDict):
    """A volume's `name` validated as a field (errors name `pod.volumes[i].name`); the rest free."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    name: Annotated[str, Field(min_length=1, max_length=63)]


Volume = Annotated[
    _NamedVolume,
    WithJsonSchema(
        {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 63,
                    "description": "Name that volumeMounts refer to; unique in the pod.",
                }
            },
            "x-kubernetes-preserve-unknown-fields": True,
        }
    ),
]
"""A pod volume exactly as in the Kubernetes pod spec; its `name` is typed so CEL can check mounts."""

WORKLOAD_UID = 1000
"""uid and gid of workload pods unless a spec overrides them (the workload image's user)."""
STREAM_KEYS_VOLUME = "stream-keys"
STREAM_KEYS_DIR = "/var/run/specops/stream-keys"
"""Where a stream's pods mount their role's CURVE keys (operator-made Secret `<name>-stream-keys`)."""
RESERVED_VOLUMES = (
    "config",
    "data",
    "output",
    "state",
    "tmp",
    "cache",
    "dshm",
    "model-cache",
    STREAM_KEYS_VOLUME,
)
"""Volume names the operator gives its own volumes."""
RESERVED_PATHS = (
    "/etc/specops",
    "/data",
    "/output",
    "/state",
    "/tmp",
    "/cache",
    "/dev/shm",
    "/model-cache",
    STREAM_KEYS_DIR,
)
"""Mount paths of those volumes."""


TRAVERSAL = re.compile(r"(^|/)\.\.(/|$)")
"""A `..` path segment: a path that climbs out of where it claims to be (`../../etc/passwd`)."""
TRAVERSAL_RE2 = "(^|/)[.][.](/|$)"
"""The same as an RE2 pattern inside a CEL string (no backslashes to escape)."""


def _cel_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: `cel` for the API server, `holds` for pydantic, one shared message."""

    cel: str
    message: str
    holds: Callable[[Any], bool]


def exactly_one(first: str, second: str, message: str) -> Rule:
    """Exactly one of two optional fields (named as in the CRD) is set."""
    a, b = to_snake(first), to_snake(second)
    return Rule(
        f"has(self.{first}) != has(self.{second})",
        message,
        lambda s: (getattr(s, a) is None) != (getattr(s, b) is None),
    )


def immutable_message(field: str) -> str:
    """The one message for a changed immutable field (CEL and the operator's own check)."""
    return f"{field} is immutable once created (a running Job cannot change); create a new resource instead"


def _transition_rules(cls: type[BaseModel]) -> list[dict[str, str]]:
    """CEL `self == oldSelf` rules for every spec field not listed in the model's MUTABLE."""
    mutable: frozenset[str] | None = getattr(cls, "MUTABLE", None)
    if mutable is None:
        return []
    rules = []
    for name, info in cls.model_fields.items():
        if name in mutable:
            continue
        f = info.alias or name
        # Required and defaulted fields are always present after API-server defaulting.
        present = info.is_required() or info.default is not None
        rule = (
            f"self.{f} == oldSelf.{f}"
            if present
            else (f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})")
        )
        rules.append({"rule": rule, "message": immutable_message(f)})
    return rules


def _schema_extras(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """Put a model's rules into its JSON schema as `x-kubernetes-validations`."""
    rules: Iterable[Rule] = getattr(cls, "cel_rules", ())
    validations = [{"rule": r.cel, "message": r.message} for r in rules] + _transition_rules(cls)
    if validations:
        schema["x-kubernetes-validations"] = validations


class Checked(Contract):
    """A Contract with cross-field `Rule`s enforced by pydantic and emitted as CEL."""

    model_config = ConfigDict(json_schema_extra=_schema_extras)
    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        broken = [rule.message for rule in type(self).cel_rules if not rule.holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self


def derive(config: type[BaseModel], name: str, drop: set[str], base: type[Contract], doc: str) -> type[Any]:
    """`config` minus the fields in `drop` (which the operator sets), as a new model on `base`.

    Field constraints, defaults and docstring descriptions carry over; model validators of
    `config` do not (the operator validates the full rendered config with `config` itself).
    """
    unknown = drop - set(config.model_fields)
    if unknown:
        raise TypeError(f"{config.__name__} has no fields {sorted(unknown)}")
    fields: dict[str, Any] = {
        field: (info.annotation, copy.copy(info))
        for field, info in config.model_fields.items()
        if field not in drop
    }
    return create_model(name, __base__=base, __doc__=doc, __module__=__name__, **fields)


# --------------------------------------------------------------------------- pod knobs


class LocalObjectReference(Contract):
    """A reference to an object in the same namespace."""

    name: DNSName
    """metadata.name of the object referred to, in this object's namespace."""


class KeySelector(Contract):
    """One key of a Secret or ConfigMap."""

    name: DNSName
    """Name of the Secret or ConfigMap."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """The key within that Secret or ConfigMap whose value is used."""
    optional: bool = False
    """Start the pod even when the object or key is missing."""


class EnvVarSource(Checked):
    """Where an environment variable's value comes from."""

    secret_key_ref: KeySelector | None = None
    """A key of a Secret (e.g. HF_TOKEN for gated verifiers)."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap (non-secret settings); set this or secretKeyRef, not both."""

    cel_rules = (
        exactly_one(
            "secretKeyRef",
            "configMapKeyRef",
            "valueFrom needs exactly one of secretKeyRef or configMapKeyRef",
        ),
    )


class EnvVar(Checked):
    """An extra environment variable for the workload container."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
    """Name of the environment variable in the workload containers, e.g. HF_TOKEN."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """The variable's literal text; set this or valueFrom, not both."""
    value_from: EnvVarSource | None = None
    """Value taken from a Secret or ConfigMap key."""

    cel_rules = (
        Rule(
            "!(has(self.value) && has(self.valueFrom))",
            "env: set value or valueFrom, not both",
            lambda s: not (s.value is not None and s.value_from is not None),
        ),
    )


class EnvFromReference(Contract):
    """A Secret or ConfigMap whose keys all become environment variables."""

    name: DNSName
    """Name of the Secret or ConfigMap."""
    optional: bool = False
    """Start the pod even when it is missing."""


class EnvFromSource(Checked):
    """Every key of a Secret or ConfigMap as environment variables (HF_TOKEN, tracking keys, ...)."""

    secret_ref: EnvFromReference | None = None
    """A Secret whose keys all become variables (e.g. one holding HF_TOKEN)."""
    config_map_ref: EnvFromReference | None = None
    """A ConfigMap whose keys all become variables."""
    prefix: Annotated[str, Field(max_length=253)] | None = None
    """Prepended to every variable name."""

    cel_rules = (
        exactly_one("secretRef", "configMapRef", "envFrom needs exactly one of secretRef or configMapRef"),
    )


class VolumeMount(Contract):
    """Where the workload container mounts one of `pod.volumes`."""

    name: Annotated[str, Field(min_length=1, max_length=63)]
    """Name of a volume in pod.volumes."""
    mount_path: Annotated[str, Field(min_length=2, max_length=1024, pattern=r"^/")]
    """Where the volume appears inside the workload container (an absolute path)."""
    read_only: bool = False
    """Mount read-only (e.g. local model weights)."""
    sub_path: Annotated[str, Field(max_length=1024)] | None = None
    """Mount only this path inside the volume."""


class Toleration(Contract):
    """A pod toleration, as in the Kubernetes pod spec."""

    key: Annotated[str, Field(max_length=317)] | None = None
    """Taint key; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches `value`."""
    value: LabelValue | None = None
    """Taint value matched by operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty = all effects."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """How long a NoExecute taint is tolerated before eviction."""


class Resources(Contract):
    """Container resource requests and limits; GPUs go under `limits` as `nvidia.com/gpu`."""

    requests: dict[Annotated[str, Field(max_length=253)], Quantity] = Field(
        default_factory=dict, max_length=16
    )
    """Minimum resources, e.g. {cpu: 8, memory: 64Gi}."""
    limits: dict[Annotated[str, Field(max_length=253)], Quantity] = Field(default_factory=dict, max_length=16)
    """Maximum resources, e.g. {nvidia.com/gpu: 1, memory: 80Gi}."""

    def gpus(self) -> int:
        """Whole GPUs asked for (limits first, as Kubernetes requires them there)."""
        raw = self.limits.get("nvidia.com/gpu", self.requests.get("nvidia.com/gpu", 0))
        try:
            return int(raw)
        except ValueError:
            return 0


class PodSettings(Checked):
    """How workload pods are scheduled and started."""

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Workload image; default: the operator's configured workload image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=8)
    """Secrets with registry credentials."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of the workload container (GPUs: limits[nvidia.com/gpu])."""
    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    """Node labels the pods require, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the pods tolerate (GPU nodes are often tainted)."""
    affinity: FreeForm | None = None
    """Pod affinity/anti-affinity, exactly as in the Kubernetes pod spec."""
    priority_class_name: Annotated[str, Field(max_length=253)] | None = None
    """Kubernetes PriorityClass for the pods; pods of a higher class may preempt lower ones when the cluster is full."""
    service_account_name: DNSName | None = None
    """ServiceAccount of the pods; its token is mounted only when this is set (pods need no API access)."""
    env: list[EnvVar] = Field(default_factory=list, max_length=32)
    """Extra environment variables (HF_TOKEN from a Secret, NCCL settings, ...)."""
    annotations: dict[LabelKey, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=32
    )
    """Added to the pods' metadata (e.g. for sidecars or cost tags); up to 32 entries."""
    shm_size: Quantity = "8Gi"
    """Size of the memory-backed /dev/shm (NCCL and data loaders need more than the 64Mi default)."""
    cache_size: Quantity = "100Gi"
    """Size limit of the scratch volume holding the Hugging Face cache (verifier weights)."""
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16)
    """Secrets or ConfigMaps whose every key becomes an environment variable."""
    volumes: list[Volume] = Field(default_factory=list, max_length=16)
    """Extra pod volumes, as in the pod spec (a PVC of local weights, a CSI driver, a Secret, ...)."""
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=16)
    """Where the workload container mounts the extra volumes."""
    termination_grace_period_seconds: Annotated[int, Field(ge=0, le=86400)] | None = None
    """Seconds between SIGTERM (preemption, eviction, deletion) and SIGKILL; a trainer checkpoints in
    them, so allow a checkpoint's time. Default: Kubernetes' 30."""
    run_as_user: Annotated[int, Field(ge=1, le=2147483647)] = WORKLOAD_UID
    """uid of the pods (never root); platforms with assigned uid ranges override it."""
    run_as_group: Annotated[int, Field(ge=0, le=2147483647)] = WORKLOAD_UID
    """Primary gid of the pods."""
    fs_group: Annotated[int, Field(ge=0, le=2147483647)] = WORKLOAD_UID
    """Group owning the volumes, so the pods can write the claims."""
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] = "OnRootMismatch"
    """OnRootMismatch: chown a volume only when its root is not already right (Always walks every
    file of a TiB data volume at each pod start)."""
    ipc_lock: bool = False
    """Add the IPC_LOCK capability (RDMA / GPUDirect pin memory); every other capability stays dropped."""
    scheduler_name: Annotated[str, Field(max_length=253)] | None = None
    """Scheduler of the pods (e.g. a gang scheduler); default: the cluster's."""
    topology_spread_constraints: list[FreeForm] = Field(default_factory=list, max_length=8)
    """Topology spread constraints, as in the pod spec; pods are labelled
    app.kubernetes.io/instance=<name> and app.kubernetes.io/component=<generator|trainer|evaluator>."""

    cel_rules = (
        Rule(
            "self.volumeMounts.all(m, self.volumes.exists(v, v.name == m.name))",
            "pod.volumeMounts: every name must be a volume in pod.volumes",
            lambda s: all(any(v["name"] == m.name for v in s.volumes) for m in s.volume_mounts),
        ),
        Rule(
            f"self.volumes.all(v, !(v.name in {_cel_list(RESERVED_VOLUMES)}))",
            f"pod.volumes: the names {', '.join(RESERVED_VOLUMES)} are the operator's own volumes",
            lambda s: all(v["name"] not in RESERVED_VOLUMES for v in s.volumes),
        ),
        Rule(
            f"self.volumeMounts.all(m, !(m.mountPath in {_cel_list(RESERVED_PATHS)}))",
            f"pod.volumeMounts: the paths {', '.join(RESERVED_PATHS)} are the operator's own mounts",
            lambda s: all(m.mount_path not in RESERVED_PATHS for m in s.volume_mounts),
        ),
    )


class StorageSpec(Checked):
    """A PersistentVolumeClaim the operator creates, or an existing one it uses."""

    size: Quantity | None = None
    """Capacity of a new claim, e.g. 500Gi."""
    storage_class_name: Annotated[str, Field(max_length=253)] | None = None
    """StorageClass of a new claim; default: the cluster default (often ReadWriteOnce only)."""
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"]] = Field(
        default=["ReadWriteMany"], min_length=1, max_length=4
    )
    """Access modes of a new claim. ReadWriteMany (required with several workers or nodes) lets pods on
    several nodes share it and needs a storage class that provides it (EFS, Filestore, Azure Files,
    CephFS, NFS); ReadWriteOnce suits one pod at a time on block storage."""
    existing_claim: DNSName | None = None
    """Use this existing claim instead of creating one (never deleted by the operator)."""
    retain: bool = True
    """Keep a created claim when the resource is deleted (data and checkpoints are expensive)."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        exactly_one(
            "size", "existingClaim", "storage needs exactly one of size (a new claim) or existingClaim"
        ),
    )

    def shared(self) -> bool:
        """Pods on several nodes can mount it at once (what `SHARED_CEL` checks on the server)."""
        return "ReadWriteMany" in self.access_modes


SHARED_CEL = "'ReadWriteMany' in {}.accessModes"
"""Several pods on one claim need ReadWriteMany: a ReadWriteOnce volume attaches to one node, and
pods on other nodes hang in ContainerCreating (Multi-Attach error)."""
ONE_NODE = "a ReadWriteOnce volume attaches to one node only"


class ModelCacheSpec(StorageSpec):
    """A claim holding the verifier's Hub snapshot: filled once by a download Job, then mounted
    read-only by every generator, trainer and evaluator pod, so a run pulls the weights once."""

    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"]] = Field(
        default=["ReadWriteMany"], min_length=1, max_length=4
    )
    """Access modes of a new claim. The download Job writes it (a writable mode is required); several
    pods reading it at once from several nodes need ReadWriteMany, or ReadOnlyMany beside ReadWriteOnce
    where the storage attaches a volume read-only to many nodes (e.g. GCE persistent disks)."""
    retain: bool = False
    """Keep a created claim when the resource is deleted (off: the Hub still has the weights; name an
    existingClaim to share one cache between runs)."""
    backoff_limit: Annotated[int, Field(ge=0, le=20)] = 4
    """Retries of the download when the Hub cannot be reached; a refused token, a missing model or a
    missing revision fail at once."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        *StorageSpec.cel_rules,
        Rule(
            "!has(self.size) || self.accessModes.exists(m, m != 'ReadOnlyMany')",
            "modelCache.accessModes: a new claim needs a writable mode (ReadWriteMany or ReadWriteOnce), "
            "since the download Job fills it",
            lambda s: s.size is None or any(m != "ReadOnlyMany" for m in s.access_modes),
        ),
    )

    def shared(self) -> bool:
        """Pods on several nodes can mount it read-only at once (what `CACHE_SHARED_CEL` checks)."""
        return "ReadWriteMany" in self.access_modes or "ReadOnlyMany" in self.access_modes


CACHE_SHARED_CEL = "('ReadWriteMany' in {0}.accessModes || 'ReadOnlyMany' in {0}.accessModes)"
"""The attach/detach controller lets a volume attach to several nodes only with either mode."""


def hub_verifier_rule(path: str, verifier: Callable[[Any], VerifierConfig | None]) -> Rule:
    """`spec.modelCache` needs a Hub verifier (at `path`, when set): local paths and GGUF files are
    not downloaded, so there is nothing to cache."""
    cel = f"self.{path}"
    parts = path.split(".")
    # has() of a nested field errors when a parent is absent: guard each level.
    absent = " || ".join(f"!has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))
    return Rule(
        f"!has(self.modelCache) || {absent} || "
        f"({cel}.nameOrPath.matches('{HUB_ID_PATTERN}') && !has({cel}.ggufFile))",
        f"spec.modelCache holds Hub models only: spec.{path}.nameOrPath must be a Hub id (org/name), "
        "without ggufFile",
        lambda s: s.model_cache is None or _is_hub(verifier(s)),
    )


def _is_hub(verifier: VerifierConfig | None) -> bool:
    return verifier is None or (
        re.match(HUB_ID_PATTERN, verifier.name_or_path) is not None and verifier.gguf_file is None
    )


class VerifierArchitecture(Contract):
    """Verifier dimensions, checked against the spec before any GPU is requested."""

    num_layers: Annotated[int, Field(ge=1, le=1024)]
    """The verifier's decoder layer count (config.json num_hidden_layers); bounds the captured layer ids."""
    hidden_size: Annotated[int, Field(ge=1, le=1_048_576)]
    """Width of the verifier's hidden states (config.json hidden_size); sets bytes per captured layer."""
    vocab_size: Annotated[int, Field(ge=1, le=16_777_216)]
    """Tokens in the verifier's vocabulary (config.json vocab_size); caps draft.draftVocabSize."""


class BrokerSpec(Checked):
    """The ZeroMQ broker between online generators and trainers (one StatefulSet pod)."""

    port: Annotated[int, Field(ge=1024, le=65535)] = 5555
    """Port producers and consumers connect to."""
    metrics_port: Annotated[int, Field(ge=1024, le=65535)] = 9100
    """Port of the broker's Prometheus /metrics endpoint (default 9100); must differ from port."""
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "2", "memory": "4Gi"}, limits={"memory": "8Gi"})
    )
    """Broker container resources; memory must exceed sync.maxBrokerBytes."""
    curve: bool = True
    """Encrypt and authenticate the stream with ZeroMQ CURVE: the operator generates a broker, a
    producer and a consumer key pair into the Secret `<name>-stream-keys` and mounts into each pod
    only its own role's keys. false = plaintext, for a network you trust (the NetworkPolicy is still
    rendered, but many CNIs do not enforce it)."""

    cel_rules = (
        Rule(
            "!has(self.port) || !has(self.metricsPort) || self.port != self.metricsPort",
            "broker.port and broker.metricsPort must differ (one socket cannot serve both)",
            lambda s: s.port != s.metrics_port,
        ),
    )


# --------------------------------------------------------------------------- workload parts

if TYPE_CHECKING:  # what mypy sees of the derived models: the fields the operator reads

    class DataGenWorkload(Checked):
        verifier: VerifierConfig
        datasets: list[DatasetSource]
        processor: ProcessorConfig
        states: StatesConfig
        engine: EngineConfig
        regenerate: RegenerateConfig | None

    class TrainWorkload(Checked):
        draft: DraftConfig
        max_steps: int | None

    class SyncParams(Contract):
        max_broker_bytes: int = 0

    class TrainDataParams(Contract):
        validation_fraction: float = 0.05

else:
    DataGenWorkload = derive(
        DataGenConfig,
        "DataGenWorkload",
        {"sync", "run", "metrics"},
        Checked,
        "DataGenConfig minus sync, run and metrics, which the operator sets per pod.",
    )
    TrainWorkload = derive(
        TrainConfig,
        "TrainWorkload",
        {
            "verifier",
            "data",
            "output_dir",
            "allowed_roots",
            "device",
            "resume",
            "metrics",
        },
        Checked,
        "TrainConfig minus the fields the operator sets (data location, output, device, resume, metrics).",
    )
    SyncParams = derive(
        SyncConfig,
        "SyncParams",
        {"kind", "path", "url", "curve_key_dir"},
        Contract,
        "Sink settings; the operator picks disk (offline) or zmq (online) and the paths and URLs.",
    )
    TrainDataParams = derive(
        TrainDataConfig,
        "TrainDataParams",
        {"kind", "path", "url", "cache_path", "vocab_from", "curve_key_dir"},
        Contract,
        "How the trainer reads data; where it reads from follows dataGenRef or dataGen.",
    )


class SpeculatorDataGenSpec(DataGenWorkload):
    """Run the verifier over datasets and keep the hidden states a draft trains on."""

    mode: Literal["offline", "online"] = "offline"
    """offline = shards on a PVC (an Indexed Job); online = stream through a broker to a trainer."""
    shards: Annotated[int, Field(ge=1, le=10000)] = 1
    """Disjoint input slices = Job completions; each pod generates one (run.shard_index)."""
    workers: Annotated[int, Field(ge=1, le=1000)] = 1
    """Generator pods running at once (Job parallelism; `kubectl scale` changes it)."""
    sync: SyncParams = Field(default_factory=SyncParams)
    """Shard size, compression and broker budgets."""
    storage: StorageSpec | None = None
    """Where offline shards go (required for mode offline)."""
    model_cache: ModelCacheSpec | None = None
    """A shared cache of the Hub verifier, downloaded once before the generators start; default:
    none, every pod downloads the verifier into its own scratch cache."""
    broker: BrokerSpec = Field(default_factory=BrokerSpec)
    """Broker pod settings, used only when mode is online (examples stream through it to a trainer)."""
    pod: PodSettings = Field(default_factory=PodSettings)
    """Image, resources and scheduling of the generator pods."""
    verifier_architecture: VerifierArchitecture | None = None
    """Verifier dimensions for validation; default: known for common verifiers, else unchecked."""
    backoff_limit_per_index: Annotated[int, Field(ge=0, le=100)] = 2
    """Retries of one shard before it counts as failed (config errors are never retried)."""
    suspend: bool = False
    """Create and keep the generator Job suspended (Kueue admits Jobs by resuming them)."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the generator Job after this many seconds."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the finished generator Job (not the data) after this many seconds."""

    MUTABLE: ClassVar[frozenset[str]] = frozenset(
        {"suspend", "workers", "active_deadline_seconds", "ttl_seconds_after_finished"}
    )
    """Everything else is fixed once pods run: a Job cannot change its pod template."""

    cel_rules = (
        Rule(
            "self.mode != 'offline' || has(self.storage)",
            "spec.storage is required for mode offline (the shards need a volume)",
            lambda s: s.mode != "offline" or s.storage is not None,
        ),
        Rule(
            "self.workers <= self.shards",
            "spec.workers must be <= spec.shards (a worker generates whole shards)",
            lambda s: s.workers <= s.shards,
        ),
        Rule(
            f"self.workers <= 1 || !has(self.storage) || {SHARED_CEL.format('self.storage')}",
            f"spec.storage.accessModes must include ReadWriteMany when spec.workers > 1 ({ONE_NODE})",
            lambda s: s.workers <= 1 or s.storage is None or s.storage.shared(),
        ),
        Rule(
            f"self.datasets.all(d, !has(d.path) || !d.path.matches('{TRAVERSAL_RE2}'))",
            "spec.datasets[].path must not contain '..' (name the file by its absolute path or package:NAME/path)",
            lambda s: not any(d.path and TRAVERSAL.search(d.path) for d in s.datasets),
        ),
        Rule(
            f"!has(self.regenerate) || !has(self.regenerate.path) || !self.regenerate.path.matches('{TRAVERSAL_RE2}')",
            "spec.regenerate.path must not contain '..' (give an absolute path)",
            lambda s: (
                s.regenerate is None or s.regenerate.path is None or not TRAVERSAL.search(s.regenerate.path)
            ),
        ),
        # The rendered DataGenConfig's own rules, so they refuse the CR instead of its pods.
        Rule(
            "self.mode == 'online' || !has(self.sync.claimRanges)",
            "spec.sync.claimRanges needs spec.mode online (the broker hands out the ranges)",
            lambda s: s.mode == "online" or s.sync.claim_ranges is None,
        ),
        Rule(
            "!has(self.regenerate) || !has(self.sync.claimRanges)",
            "spec.regenerate is not supported with spec.sync.claimRanges (each generator regenerates its own slice)",
            lambda s: s.regenerate is None or s.sync.claim_ranges is None,
        ),
        Rule(
            "self.mode != 'online' || !has(self.regenerate) || has(self.regenerate.path)",
            "spec.regenerate.path is required for mode online (there is no shard volume to keep the answers on)",
            lambda s: s.mode != "online" or s.regenerate is None or s.regenerate.path is not None,
        ),
        hub_verifier_rule("verifier", lambda s: s.verifier),
        Rule(
            f"self.workers <= 1 || !has(self.modelCache) || {CACHE_SHARED_CEL.format('self.modelCache')}",
            "spec.modelCache.accessModes must include ReadWriteMany or ReadOnlyMany when spec.workers > 1 "
            f"(every generator pod mounts it; {ONE_NODE})",
            lambda s: s.workers <= 1 or s.model_cache is None or s.model_cache.shared(),
        ),
        Rule(
            "self.datasets.all(d, has(d.preset) || (has(d.path) && size(d.path) > 0))",
            "spec.datasets[].path is required unless spec.datasets[].preset is set",
            lambda s: all(d.preset or d.path for d in s.datasets),
        ),
    )


class EvaluationSpec(Contract):
    """Acceptance-length evaluation of the trained speculator against its verifier."""

    enabled: bool = True
    """Run `specops evaluate` after training; off = export without evaluating."""
    max_prompts: Annotated[int, Field(ge=1, le=10000)] = 32
    """Held-out prompts decoded to measure acceptance (default 32); more gives a steadier number."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    """Tokens generated per prompt."""
    max_mismatch_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Share of prompts whose speculative output may differ from the verifier's plain greedy
    decoding before the evaluation fails; default 0 in float32, 0.5 in bfloat16/float16."""
    resources: Resources | None = None
    """Evaluation pod resources; default: the training pod's, with one GPU when it has GPUs."""


class HubExportSpec(HubTarget):
    """A Hub repository to upload to, and the Secret key holding the upload token."""

    token_secret: KeySelector | None = None
    """Secret key with a Hub token that may write to `repo`: the upload pod's HF_TOKEN (no other
    pod gets it); default: none (a Hub that takes uploads without a token)."""


class ExportSpec(ExportConfig, Checked):
    """Upload the trained speculator (config, weights, a generated model card) once it is trained
    and evaluated: to one Hub repository or one object-store prefix. The upload runs as its own pod
    (`specops push`), the only one that gets the credentials; the output claim keeps its copy."""

    hub: HubExportSpec | None = None
    """Upload config, weights and a generated model card to this Hub repository."""
    credentials_secret: LocalObjectReference | None = None
    """Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN optional)
    for `uri`, given to the upload pod only; default: none (the pod's own workload identity)."""
    resources: Resources | None = None
    """Upload pod resources; default: requests of 500m CPU and 1Gi memory."""

    cel_rules = (
        exactly_one("hub", "uri", "spec.export needs exactly one of hub or uri"),
        Rule(
            "!has(self.endpointUrl) || has(self.uri)",
            "spec.export.endpointUrl needs spec.export.uri (a Hub endpoint is HF_ENDPOINT in spec.pod.env)",
            lambda s: s.endpoint_url is None or s.uri is not None,
        ),
        Rule(
            "!has(self.credentialsSecret) || has(self.uri)",
            "spec.export.credentialsSecret needs spec.export.uri (a Hub token goes in spec.export.hub.tokenSecret)",
            lambda s: s.credentials_secret is None or s.uri is not None,
        ),
    )


class TrainerSpec(Contract):
    """How the trainer pods fail and meet as one torchrun group."""

    max_restarts: Annotated[int, Field(ge=0, le=100)] = 3
    """Whole-group restarts before the training fails: when a rank fails with a retryable exit
    (1, a signal, an eviction), every trainer pod is replaced and all resume from the newest
    checkpoint. Exits 2, 3 and 4 fail the training at once."""
    rendezvous_timeout_seconds: Annotated[int, Field(ge=60, le=86400)] = 900
    """How long the ranks of one attempt wait for each other (torchrun c10d `join_timeout`):
    long enough for the slowest pod to be scheduled and pull its image."""


def _on_draft(holds: Callable[[DraftConfig], bool]) -> Callable[[Any], bool]:
    """A DraftConfig rule as a spec-level check (the draft section is always there in the model)."""
    return lambda spec: holds(spec.draft)


class SpeculatorTrainingSpec(TrainWorkload):
    """Train an EAGLE-3 or HASS speculator on generated data and export it for vLLM."""

    verifier: VerifierConfig | None = None
    """The verifier; default: the data generator's (they must be the same model)."""
    data: TrainDataParams = Field(default_factory=TrainDataParams)
    """Validation split, prefetch and shuffling of the training data."""
    data_gen_ref: LocalObjectReference | None = None
    """A SpeculatorDataGen in this namespace whose data to train on."""
    data_gen: SpeculatorDataGenSpec | None = None
    """An inline data generation run (created as the child SpeculatorDataGen `<name>-data`)."""
    nodes: Annotated[int, Field(ge=1, le=128)] = 1
    """Trainer pods (torchrun nodes; Indexed Job completions)."""
    procs_per_node: Annotated[int, Field(ge=1, le=64)] | None = None
    """Ranks per pod; default: the pod's nvidia.com/gpu limit, or 1 without GPUs."""
    storage: StorageSpec
    """Where checkpoints and the exported speculator go."""
    model_cache: ModelCacheSpec | None = None
    """A shared cache of the Hub verifier, downloaded once before any pod loads it (an inline
    dataGen's generators share it); default: none, every pod downloads into its own scratch cache."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Whether and how the trained draft's acceptance length is measured after training."""
    export: ExportSpec | None = None
    """Upload the trained draft to a Hub repository or an object store after its evaluation;
    default: it stays on the output claim only. May change at any time: a changed (or added)
    export uploads again, also after the run completed; removing it cancels an upload not started."""
    pod: PodSettings = Field(default_factory=PodSettings)
    """Image, resources and scheduling of the trainer pods."""
    verifier_architecture: VerifierArchitecture | None = None
    """Verifier dimensions for validation; default: known for common verifiers, else unchecked."""
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    """Group restarts and rendezvous of the trainer pods (changes apply from the next attempt)."""
    suspend: bool = False
    """Create and keep the trainer Job suspended."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the trainer Job after this many seconds."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete finished Jobs (not the checkpoints) after this many seconds."""

    MUTABLE: ClassVar[frozenset[str]] = frozenset(
        {"suspend", "trainer", "export", "active_deadline_seconds", "ttl_seconds_after_finished"}
    )
    """Everything else is fixed once pods run: a Job cannot change its pod template. `export` may
    change: the upload Job is replaced (one not running, or once it ended) and uploads again."""

    cel_rules = (
        exactly_one("dataGenRef", "dataGen", "spec needs exactly one of dataGenRef or dataGen"),
        Rule(
            "!has(self.dataGen) || self.dataGen.mode != 'online' || has(self.maxSteps)",
            "spec.maxSteps is required when spec.dataGen.mode is online (a stream has no known length)",
            lambda s: s.data_gen is None or s.data_gen.mode != "online" or s.max_steps is not None,
        ),
        Rule(
            f"self.nodes <= 1 || !has(self.storage) || {SHARED_CEL.format('self.storage')}",
            f"spec.storage.accessModes must include ReadWriteMany when spec.nodes > 1 ({ONE_NODE})",
            lambda s: s.nodes <= 1 or s.storage.shared(),
        ),
        Rule(
            "self.nodes <= 1 || !has(self.dataGen) || !has(self.dataGen.storage) || "
            + SHARED_CEL.format("self.dataGen.storage"),
            "spec.dataGen.storage.accessModes must include ReadWriteMany when spec.nodes > 1 "
            f"(every trainer pod mounts the data; {ONE_NODE})",
            lambda s: (
                s.nodes <= 1
                or s.data_gen is None
                or s.data_gen.storage is None
                or s.data_gen.storage.shared()
            ),
        ),
        hub_verifier_rule("verifier", lambda s: s.verifier),
        hub_verifier_rule("dataGen.verifier", lambda s: s.data_gen.verifier if s.data_gen else None),
        Rule(
            "!has(self.draft) || !has(self.draft.initFrom) || !has(self.draft.initFromVerifier) || "
            "!self.draft.initFromVerifier",
            "spec.draft.initFrom and spec.draft.initFromVerifier both set the starting weights; use one",
            lambda s: s.draft.init_from is None or not s.draft.init_from_verifier,
        ),
        Rule(
            f"!has(self.draft) || !has(self.draft.initFrom) || !self.draft.initFrom.matches('{TRAVERSAL_RE2}')",
            "spec.draft.initFrom must not contain '..' (give a Hub id or an absolute path)",
            lambda s: s.draft.init_from is None or not TRAVERSAL.search(s.draft.init_from),
        ),
        Rule(
            "!has(self.dataGen) || !has(self.dataGen.modelCache)",
            "spec.dataGen.modelCache: set spec.modelCache instead (the inline data generation shares "
            "the training's cache)",
            lambda s: s.data_gen is None or s.data_gen.model_cache is None,
        ),
        Rule(
            f"!has(self.modelCache) || {CACHE_SHARED_CEL.format('self.modelCache')} || (self.nodes <= 1 && "
            "(!has(self.dataGen) || (self.dataGen.workers <= 1 && self.dataGen.mode == 'offline')))",
            "spec.modelCache.accessModes must include ReadWriteMany or ReadOnlyMany when several pods "
            "read it at once (spec.nodes > 1, spec.dataGen.workers > 1 or spec.dataGen.mode online; "
            f"{ONE_NODE})",
            lambda s: (
                s.model_cache is None
                or s.model_cache.shared()
                or (
                    s.nodes <= 1
                    and (s.data_gen is None or (s.data_gen.workers <= 1 and s.data_gen.mode == "offline"))
                )
            ),
        ),
        *(
            Rule(
                f"!has(self.draft) || ({cel.format(d='self.draft')})",
                message.replace("draft.", "spec.draft."),
                _on_draft(holds),
            )
            for cel, message, holds in DRAFT_RULES
        ),
    )


# --------------------------------------------------------------------------- status


class Condition(Contract):
    """A metav1.Condition."""

    type: Annotated[
        str, Field(min_length=1, max_length=316, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    ]
    """Condition type, e.g. Ready, Complete, ShardsComplete."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[
        str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    ]
    """CamelCase reason for the last transition."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] = 0
    """metadata.generation the condition was computed from."""


Conditions = Annotated[
    list[Condition],
    Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


class DataGenProgress(Contract):
    """Generation progress, from the Job, the finished pods' reports and the running pods' metrics."""

    shards: Annotated[str, Field(max_length=32)] = ""
    """done/total, for `kubectl get`."""
    shards_done: Annotated[int, Field(ge=0)] = 0
    """Shards (completion indexes) finished."""
    shards_total: Annotated[int, Field(ge=0)] = 0
    """Shards (Job completion indexes) the run has in total (spec.shards)."""
    shards_failed: Annotated[int, Field(ge=0)] = 0
    """Shards that exhausted their retries."""
    examples: Annotated[int, Field(ge=0)] = 0
    """Examples stored by finished shards (written + already present)."""
    tokens: Annotated[int, Field(ge=0)] = 0
    """Tokens written by finished shards."""
    generator_seconds: Annotated[float, Field(ge=0.0)] = 0.0
    """Pod-seconds the finished shards took."""
    tokens_per_second: Annotated[float, Field(ge=0.0)] = 0.0
    """Mean tokens/s of one generator pod over finished shards."""
    counted_indexes: Annotated[str, Field(max_length=65536)] = ""
    """Completion indexes whose reports are summed above (ranges such as 0-3,7)."""
    running_done: Annotated[int, Field(ge=0)] | None = None
    """Examples the running generators have processed (written, dropped or failed) in this run
    (live, from their metrics; a shard's final count is in `examples` once it ends)."""
    running_total: Annotated[int, Field(ge=0)] | None = None
    """Examples the running generators' shards hold, not yet stored when they started (live)."""
    running_answered: Annotated[int, Field(ge=0)] | None = None
    """With `regenerate`: conversations the running generators have answered so far in this run
    (live; their capture, `runningDone`, starts once all of a shard's are answered)."""
    running_answer_total: Annotated[int, Field(ge=0)] | None = None
    """With `regenerate`: conversations the running generators' shards have to answer, those no
    answers file holds yet (live)."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """The slowest running generator's estimate of seconds until its shard is done (live; shards
    not started yet are not in it; 0 once complete)."""
    eta: Annotated[str, Field(max_length=32)] | None = None
    """The same estimate for people (`1h30m`)."""
    updated_at: Annotated[str, Field(max_length=64)] | None = None
    """When the running generators' metrics were last read."""


class DataGenStatus(Contract):
    """Observed state of a SpeculatorDataGen."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """metadata.generation this status describes."""
    conditions: Conditions
    """Ready/Reconciling/Stalled, Suspended/Running/Complete/Failed, VerifierCompatible, ShardsComplete, StreamConnected."""
    progress: DataGenProgress = Field(default_factory=DataGenProgress)
    """Shards, examples and throughput."""
    workers: Annotated[int, Field(ge=0)] = 0
    """Generator pods running now (the scale subresource's replicas)."""
    selector: Annotated[str, Field(max_length=1024)] = ""
    """Label selector of the generator pods (for the scale subresource)."""
    claim_name: Annotated[str, Field(max_length=253)] = ""
    """PersistentVolumeClaim holding the shards."""
    data_path: Annotated[str, Field(max_length=1024)] = ""
    """Directory of the shards inside that claim's mount."""
    broker_url: Annotated[str, Field(max_length=512)] = ""
    """ZeroMQ address of the broker (mode online)."""


class TrainingProgress(Contract):
    """Training progress, from the trainer Job and rank 0's report."""

    step: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps done: live from rank 0's metrics while training, final from its report."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps the run will make (live, from rank 0's metrics)."""
    loss: float | None = None
    """Training loss of the last logged window (live, from rank 0's metrics)."""
    tokens_per_second: Annotated[float, Field(ge=0.0)] | None = None
    """Trained tokens per second over all ranks (live)."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds until the last step (live; 0 once trained)."""
    eta: Annotated[str, Field(max_length=32)] | None = None
    """The same estimate for people (`1h30m`): the ETA column."""
    updated_at: Annotated[str, Field(max_length=64)] | None = None
    """When rank 0's metrics were last read."""
    best_val_loss: float | None = None
    """Lowest validation loss seen so far (its checkpoint is exported as `best`); null before any evaluation."""
    nodes_active: Annotated[int, Field(ge=0)] = 0
    """Trainer pods running now."""


class EvaluationResult(Contract):
    """What `specops evaluate` measured."""

    acceptance_length: Annotated[float, Field(ge=0.0)] = 0.0
    """Mean tokens produced per verifier step (1 + accepted drafts)."""
    per_position: list[float] = Field(default_factory=list, max_length=64)
    """Acceptance rate of draft position 1..k."""
    lossless: bool = True
    """Speculative output equals greedy decoding of the verifier."""
    mismatch_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Share of prompts whose output differs from greedy decoding (checked against maxMismatchRate)."""
    prompts: Annotated[int, Field(ge=0)] = 0
    """How many held-out prompts the measurement used."""
    held_out_conversations: Annotated[int, Field(ge=0)] | None = None
    """Conversations the prompts came from, all held out of training by its split."""


class Artifact(Contract):
    """The exported speculator and how to serve it."""

    claim_name: Annotated[str, Field(max_length=253)]
    """PersistentVolumeClaim holding it."""
    path: Annotated[str, Field(max_length=1024)]
    """Directory (config.json + model.safetensors) where the trainer mounts the claim."""
    verifier: Annotated[str, Field(max_length=512)]
    """Hub id or path of the verifier to pass to `vllm serve` with this draft."""
    algorithm: Literal["eagle3", "hass"]
    """eagle3 or hass: how the draft was trained (both serve as EAGLE-3 in vLLM)."""
    speculative_tokens: Annotated[int, Field(ge=1)]
    """Draft tokens per step it was trained for."""
    vllm_serve_command: Annotated[str, Field(max_length=4096)]
    """Serve it: mount the claim at the same path and run this."""
    url: Annotated[str, Field(max_length=1024)] | None = None
    """Where `spec.export` uploaded it: the Hub repository's URL or the s3:// prefix; unset until uploaded."""
    revision: Annotated[str, Field(max_length=64)] | None = None
    """The Hub commit the upload made (none for an object store)."""


class TrainerRestart(Contract):
    """The failure that made the operator restart the trainer group (or fail it)."""

    attempt: Annotated[int, Field(ge=0)] = 0
    """The attempt that failed (0 = the first trainer Job)."""
    pod: Annotated[str, Field(max_length=253)] = ""
    """The trainer pod that failed first."""
    rank: Annotated[int, Field(ge=0)] | None = None
    """Its completion index (the torchrun node)."""
    exit_code: int | None = None
    """Its container's exit code (137: killed; none when it was evicted before it ran)."""
    reason: Annotated[str, Field(max_length=256)] = ""
    """Error, OOMKilled, Evicted, ... as Kubernetes reported it."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """What the workload said (its error line), or the Job's failure message."""


class TrainerStatus(Contract):
    """Whole-group restarts of the trainer."""

    restarts: Annotated[int, Field(ge=0)] = 0
    """Group restarts so far; the trainer Job of attempt N carries the annotation specops.dev/attempt: N."""
    last_failure: TrainerRestart | None = None
    """What ended the last failed attempt."""


class UploadRecord(Contract):
    """Which upload the Published condition describes, so a changed `spec.export` (or a new
    `specops.dev/retry-upload` annotation) is seen even after the upload Job is gone."""

    export_hash: Annotated[str, Field(max_length=64)] = ""
    """A hash of `spec.export` (as the upload Job's annotation specops.dev/export-hash)."""
    retry: Annotated[str, Field(max_length=253)] = ""
    """The specops.dev/retry-upload annotation's value it was made for."""


class TrainingStatus(Contract):
    """Observed state of a SpeculatorTraining."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """metadata.generation this status describes."""
    conditions: Conditions
    """Ready/Reconciling/Stalled, Suspended/Running/Complete/Failed, VerifierCompatible, Evaluated, Exported."""
    progress: TrainingProgress = Field(default_factory=TrainingProgress)
    """Steps and loss."""
    data_gen: Annotated[str, Field(max_length=253)] = ""
    """Name of the SpeculatorDataGen whose output this training reads (referenced or created inline)."""
    verifier: Annotated[str, Field(max_length=512)] = ""
    """Hub id or path of the verifier this training uses."""
    trainer: TrainerStatus = Field(default_factory=TrainerStatus)
    """Group restarts and their causes."""
    evaluation: EvaluationResult | None = None
    """Acceptance measured after training."""
    artifact: Artifact | None = None
    """Where the exported speculator lies and the command that serves it; set once exported."""
    upload: UploadRecord | None = None
    """The `spec.export` (and retry request) the Published condition is about."""


# --------------------------------------------------------------------------- resources


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta SpecOps reads; everything else passes through."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: str = ""
    """The object's name; children are named after it with suffixes, hence at most 40 characters."""
    namespace: str | None = None
    """The namespace the object and all its children live in."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; `kueue.x-k8s.io/queue-name` is copied to the child Jobs."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations, kept as they are."""
    uid: str | None = None
    """Set by the API server; children's ownerReferences point at it."""
    generation: int | None = None
    """Set by the API server on each spec change; status.observedGeneration echoes it."""


_NAME_RULE = Rule(
    f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    f"metadata.name must be at most {MAX_NAME_LENGTH} characters (children append suffixes)",
    lambda r: len(r.metadata.name) <= MAX_NAME_LENGTH,
)


class SpeculatorDataGen(Checked):
    """A data generation run (kind SpeculatorDataGen)."""

    api_version: Literal["specops.dev/v1alpha1"] = "specops.dev/v1alpha1"
    """Always specops.dev/v1alpha1."""
    kind: Literal["SpeculatorDataGen"] = "SpeculatorDataGen"
    """The object's type: always SpeculatorDataGen."""
    metadata: ObjectMeta
    """Name, namespace, labels and annotations."""
    spec: SpeculatorDataGenSpec
    """What to run: the data generation settings and the pod, storage and scheduling knobs."""
    status: DataGenStatus | None = None
    """What the operator observed; written by the operator only."""

    cel_rules = (_NAME_RULE,)


class SpeculatorTraining(Checked):
    """A training run (kind SpeculatorTraining)."""

    api_version: Literal["specops.dev/v1alpha1"] = "specops.dev/v1alpha1"
    """Always specops.dev/v1alpha1."""
    kind: Literal["SpeculatorTraining"] = "SpeculatorTraining"
    """The object's type: always SpeculatorTraining."""
    metadata: ObjectMeta
    """Name, namespace, labels and annotations."""
    spec: SpeculatorTrainingSpec
    """What to run: the training settings and the pod, storage and scheduling knobs."""
    status: TrainingStatus | None = None
    """What the operator observed; written by the operator only."""

    cel_rules = (_NAME_RULE,)


Resource = SpeculatorDataGen | SpeculatorTraining
KINDS: dict[str, type[SpeculatorDataGen] | type[SpeculatorTraining]] = {
    DATAGEN_KIND: SpeculatorDataGen,
    TRAINING_KIND: SpeculatorTraining,
}


def parse_resource(obj: Any, source: str = "<object>") -> Resource:
    """Validate one CR mapping; errors name the field (`spec.dataGen.shards: ...`)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: a resource must be a mapping, got {type(obj).__name__}")
    kind = obj.get("kind")
    model = KINDS.get(str(kind))
    if model is None:
        raise ConfigError(f"{source}: kind: expected one of {sorted(KINDS)}, got {kind!r}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{source} ({kind})")) from None


def load_resources(text: str, source: str = "<yaml>") -> list[Resource]:
    """Every SpecOps resource in a (multi-document) YAML text; other kinds are errors."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return [parse_resource(doc, f"{source}[{i}]") for i, doc in enumerate(docs)]


def immutable_changes(old_spec: dict[str, Any], new_spec: dict[str, Any], kind: str) -> list[str]:
    """One message per spec field that changed but may not (what the CEL transition rules reject)."""
    spec_model = KINDS[kind].model_fields["spec"].annotation
    assert isinstance(spec_model, type) and issubclass(spec_model, Checked)
    old = spec_model.model_validate(old_spec).model_dump(mode="json", by_alias=True)
    new = spec_model.model_validate(new_spec).model_dump(mode="json", by_alias=True)
    mutable: frozenset[str] = getattr(spec_model, "MUTABLE", frozenset())
    return [
        immutable_message(info.alias or name)
        for name, info in spec_model.model_fields.items()
        if name not in mutable and old.get(info.alias or name) != new.get(info.alias or name)
    ]
