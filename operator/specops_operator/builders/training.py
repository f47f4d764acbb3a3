"""SpeculatorTraining -> children.

Always: ConfigMap (rendered TrainConfig), output PVC, headless Service (torchrun rendezvous DNS),
and the child SpeculatorDataGen when the data generation is inline. Once the data is ready
(offline: ShardsComplete; online: StreamConnected): the trainer Indexed Job. Once it completed:
the evaluation Job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specops.config import TrainConfig, dump_config, load_config
from specops_operator import API_VERSION
from specops_operator.api import (
    DATAGEN_KIND,
    Resources,
    SpeculatorDataGenSpec,
    SpeculatorTraining,
    SpeculatorTrainingSpec,
    VerifierConfig,
)
from specops_operator.builders import common
from specops_operator.builders.common import Defaults, Manifest, Owner, PodParts
from specops_operator.builders.datagen import DataGenNames
from specops_operator.conditions import is_true

TRAINER = "trainer"
EVALUATOR = "evaluator"
RENDEZVOUS_PORT = 29500
METRICS_PORT = 9400
"""Each rank's progress metrics: METRICS_PORT + local rank (the pod's port `metrics` is local rank 0)."""
FINAL_DIR = f"{common.OUTPUT_ROOT}/final"
"""Where the trainer publishes the exported speculator."""
EVALUATION_FILE = f"{common.OUTPUT_ROOT}/evaluation.json"


@dataclass(frozen=True)
class TrainingNames:
    name: str
    namespace: str

    @property
    def config(self) -> str:
        return f"{self.name}-train"

    @property
    def job(self) -> str:
        return f"{self.name}-train"

    @property
    def service(self) -> str:
        return f"{self.name}-train"

    @property
    def claim(self) -> str:
        return f"{self.name}-output"

    @property
    def eval_job(self) -> str:
        return f"{self.name}-eval"

    @property
    def datagen(self) -> str:
        """The child SpeculatorDataGen of an inline `dataGen`."""
        return f"{self.name}-data"

    def claim_for(self, spec: SpeculatorTrainingSpec) -> str:
        return spec.storage.existing_claim or self.claim

    @property
    def master_addr(self) -> str:
        """DNS name of completion index 0 (Indexed Job hostname + the headless Service)."""
        return f"{self.job}-0.{self.service}"


@dataclass(frozen=True)
class DataSource:
    """The SpeculatorDataGen a training reads, as far as the training needs to know it."""

    names: DataGenNames
    spec: SpeculatorDataGenSpec
    status: dict[str, Any] = field(default_factory=dict)
    found: bool = True

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return list(self.status.get("conditions") or [])

    @property
    def ready(self) -> bool:
        """Offline data is complete, or the online broker accepts consumers."""
        wanted = "ShardsComplete" if self.spec.mode == "offline" else "StreamConnected"
        return self.found and is_true(self.conditions, wanted)

    @property
    def failed(self) -> bool:
        return is_true(self.conditions, "Failed")

    @property
    def claim(self) -> str:
        return self.names.claim_for(self.spec)

    @property
    def url(self) -> str:
        return self.names.broker_url(self.spec)

    @classmethod
    def of(cls, obj: dict[str, Any]) -> DataSource:
        """From a SpeculatorDataGen object read from the API server (spec already validated there)."""
        meta = obj["metadata"]
        spec = SpeculatorDataGenSpec.model_validate(obj["spec"])
        return cls(DataGenNames(meta["name"], meta["namespace"]), spec, dict(obj.get("status") or {}))


def verifier_of(spec: SpeculatorTrainingSpec, data: DataSource) -> VerifierConfig:
    return spec.verifier or data.spec.verifier


def render_config(spec: SpeculatorTrainingSpec, data: DataSource) -> TrainConfig:
    """The TrainConfig every trainer rank reads; raises ConfigError naming the field."""
    fields = (set(TrainConfig.model_fields) & set(type(spec).model_fields)) - {"verifier", "data"}
    source: dict[str, Any] = spec.data.model_dump(mode="json")
    if data.spec.mode == "offline":
        source.update(kind="disk", path=common.SHARDS_DIR)
    else:
        source.update(kind="zmq", url=data.url)
    config = {
        **spec.model_dump(mode="json", include=fields, exclude_none=True),
        "verifier": verifier_of(spec, data).model_dump(mode="json", exclude_none=True),
        "data": source,
        "output_dir": common.OUTPUT_ROOT,
        "allowed_roots": common.ALLOWED_ROOTS,
        "device": "auto",
        "resume": "auto",
        "metrics": {"port": METRICS_PORT},  # bound to the pod's IP by the container's args
    }
    return load_config(TrainConfig, config)


def procs_per_node(spec: SpeculatorTrainingSpec) -> int:
    return spec.procs_per_node or max(1, spec.pod.resources.gpus())


def _volumes(
    spec: SpeculatorTrainingSpec, names: TrainingNames, data: DataSource
) -> tuple[list[Manifest], list[Manifest]]:
    output_volume, output_mount = common.claim_volume("output", names.claim_for(spec), common.OUTPUT_ROOT)
    volumes, mounts = [output_volume], [output_mount]
    if data.spec.mode == "offline":
        data_volume, data_mount = common.claim_volume("data", data.claim, common.DATA_ROOT, read_only=True)
        volumes.append(data_volume)
        mounts.append(data_mount)
    return volumes, mounts


def _trainer_job(
    cr: SpeculatorTraining, owner: Owner, names: TrainingNames, data: DataSource, defaults: Defaults
) -> Manifest:
    spec = cr.spec
    config_volume, config_mount = common.config_volume(names.config)
    volumes, mounts = _volumes(spec, names, data)
    rendezvous = [
        ("PET_NNODES", str(spec.nodes)),
        ("PET_NPROC_PER_NODE", str(procs_per_node(spec))),
        ("PET_MASTER_ADDR", names.master_addr),
        ("PET_MASTER_PORT", str(RENDEZVOUS_PORT)),
        ("MASTER_ADDR", names.master_addr),
        ("MASTER_PORT", str(RENDEZVOUS_PORT)),
    ]
    parts = PodParts(
        component=TRAINER,
        args=[
            *("torchrun", "--module", "specops.cli", "train", "--config", common.CONFIG_FILE),
            *("--metrics.host", "$(POD_IP)"),  # one config for all ranks; each pod has its own IP
        ],
        env=[
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            common.index_env("JOB_COMPLETION_INDEX"),
            common.index_env("PET_NODE_RANK"),
            *({"name": k, "value": v} for k, v in rendezvous),
        ],
        volumes=[config_volume, *volumes],
        mounts=[config_mount, *mounts],
        resources=spec.pod.resources,
        ports=(
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ),
        subdomain=names.service,
    )
    return common.job(
        owner,
        names.job,
        TRAINER,
        common.pod_template(owner, spec.pod, defaults, parts),
        completions=spec.nodes,
        parallelism=spec.nodes,
        suspend=spec.suspend,
        backoff={"backoffLimit": spec.backoff_limit},
        deadline=spec.active_deadline_seconds,
        ttl=spec.ttl_seconds_after_finished,
    )


def evaluation_resources(spec: SpeculatorTrainingSpec) -> Resources:
    """Explicit evaluation resources, else the trainer's with at most one GPU."""
    if spec.evaluation.resources is not None:
        return spec.evaluation.resources
    base = spec.pod.resources
    if base.gpus() <= 1:
        return base
    limits = {**base.limits, "nvidia.com/gpu": 1}
    requests = {k: v for k, v in base.requests.items() if k != "nvidia.com/gpu"}
    return Resources(requests=requests, limits=limits)


def _eval_job(
    cr: SpeculatorTraining, owner: Owner, names: TrainingNames, data: DataSource, defaults: Defaults
) -> Manifest:
    spec = cr.spec
    verifier = verifier_of(spec, data)
    volumes, mounts = _volumes(spec, names, data)
    args = [
        "specops",
        "evaluate",
        "--speculator",
        FINAL_DIR,
        "--verifier",
        verifier.name_or_path,
        "--data",
        common.SHARDS_DIR,
        "--max-prompts",
        str(spec.evaluation.max_prompts),
        "--max-new-tokens",
        str(spec.evaluation.max_new_tokens),
        "--output",
        EVALUATION_FILE,
    ]
    if verifier.gguf_file:
        args += ["--gguf-file", verifier.gguf_file]
    for root in common.ALLOWED_ROOTS:
        args += ["--allowed-root", root]
    parts = PodParts(
        component=EVALUATOR,
        args=args,
        env=[],
        volumes=volumes,
        mounts=mounts,
        resources=evaluation_resources(spec),
    )
    return common.job(
        owner,
        names.eval_job,
        EVALUATOR,
        common.pod_template(owner, spec.pod, defaults, parts),
        completions=1,
        parallelism=1,
        suspend=spec.suspend,
        backoff={"backoffLimit": 1},
        deadline=spec.active_deadline_seconds,
        ttl=spec.ttl_seconds_after_finished,
    )


def _service(owner: Owner, names: TrainingNames) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(owner, names.service, TRAINER),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve before it is ready: the rendezvous happens before readiness.
            "publishNotReadyAddresses": True,
            "selector": common.selector_labels(owner, TRAINER),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def child_datagen(cr: SpeculatorTraining, names: TrainingNames) -> Manifest:
    """The SpeculatorDataGen of an inline `dataGen`; suspending the training suspends it too."""
    owner = Owner.of(cr)
    assert cr.spec.data_gen is not None
    inline = cr.spec.data_gen
    # What the user wrote (the API server fills the defaults from the same CRD), plus suspend.
    spec = inline.model_dump(mode="json", by_alias=True, exclude_unset=True)
    spec["suspend"] = inline.suspend or cr.spec.suspend
    return {
        "apiVersion": API_VERSION,
        "kind": DATAGEN_KIND,
        "metadata": common.metadata(owner, names.datagen, "data", queue=True),
        "spec": spec,
    }


def inline_source(cr: SpeculatorTraining, status: dict[str, Any] | None) -> DataSource:
    """The DataSource of an inline `dataGen` (its child's status, if it exists yet)."""
    assert cr.spec.data_gen is not None and cr.metadata.namespace
    names = TrainingNames(cr.metadata.name, cr.metadata.namespace)
    return DataSource(
        DataGenNames(names.datagen, names.namespace), cr.spec.data_gen, status or {}, status is not None
    )


def build_training(
    cr: SpeculatorTraining, defaults: Defaults, data: DataSource, *, trained: bool
) -> list[Manifest]:
    """The children this training needs now, in creation order."""
    owner = Owner.of(cr)
    names = TrainingNames(owner.name, owner.namespace)
    spec = cr.spec
    children: list[Manifest] = []
    if spec.data_gen is not None:
        children.append(child_datagen(cr, names))
    children.append(common.config_map(owner, names.config, dump_config(render_config(spec, data))))
    if spec.storage.size is not None:
        children.append(common.claim(owner, names.claim, "output", spec.storage.size, spec.storage))
    children.append(_service(owner, names))
    if data.ready:
        children.append(_trainer_job(cr, owner, names, data, defaults))
    if trained and spec.evaluation.enabled and data.spec.mode == "offline":
        children.append(_eval_job(cr, owner, names, data, defaults))
    return children
