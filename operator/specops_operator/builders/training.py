"""SpeculatorTraining -> children.

Always: ConfigMap (rendered TrainConfig), output PVC, headless Service (torchrun rendezvous DNS),
and the child SpeculatorDataGen when the data generation is inline. Once the data is ready
(offline: ShardsComplete; online: StreamConnected): the trainer Indexed Job of the current
attempt. Once it completed: the evaluation Job. With `export`: the upload Job, once the
evaluation succeeded (or right after training when there is none; after a failed evaluation,
nothing is uploaded). With `modelCache`: its claim and download Job (the
inline child DataGen's, when the data generation is inline), and the trainer Job only once the
download succeeded.

The trainer pods are one torchrun group: a rank that fails cannot rejoin the others, so the Job
fails on its first failed pod (`backoffLimit` 0) and the operator replaces the whole group (the
next attempt, `spec.trainer.maxRestarts` at most), whose ranks meet in a c10d rendezvous of their
own id and resume from the newest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specops.config import TrainConfig, dump_config, load_config
from specops_operator import API_VERSION, PREFIX
from specops_operator.api import (
    DATAGEN_KIND,
    TRAINING_KIND,
    Resources,
    SpeculatorDataGenSpec,
    SpeculatorTraining,
    SpeculatorTrainingSpec,
    VerifierConfig,
)
from specops_operator.builders import common, publish, stream
from specops_operator.builders.common import Defaults, Manifest, Owner, PodParts
from specops_operator.builders.datagen import DataGenNames
from specops_operator.builders.modelcache import CacheNames, ModelCache, build_cache, reader_parts
from specops_operator.conditions import is_true

TRAINER = "trainer"
EVALUATOR = "evaluator"
RENDEZVOUS_PORT = 29500
FINAL_DIR = f"{common.OUTPUT_ROOT}/final"
"""Where the trainer publishes the exported speculator."""
EVALUATION_FILE = f"{common.OUTPUT_ROOT}/evaluation.json"
ATTEMPT_ANNOTATION = f"{PREFIX}/attempt"
"""On the trainer Job: which attempt it runs (0, then one more per group restart)."""


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
    def publish_job(self) -> str:
        return f"{self.name}-publish"

    @property
    def datagen(self) -> str:
        """The child SpeculatorDataGen of an inline `dataGen`."""
        return f"{self.name}-data"

    def claim_for(self, spec: SpeculatorTrainingSpec) -> str:
        return spec.storage.existing_claim or self.claim

    def node_addr(self, index: str) -> str:
        """DNS name of a completion index: its Indexed-Job hostname + the headless Service."""
        return f"{self.job}-{index}.{self.service}"

    @property
    def rendezvous_endpoint(self) -> str:
        """Completion index 0, which hosts the c10d rendezvous store, and its port."""
        return f"{self.node_addr('0')}:{RENDEZVOUS_PORT}"


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

    @property
    def access(self) -> stream.StreamAccess:
        """What a consumer of this data needs to reach its stream (nothing for offline data)."""
        return stream.access(self.names.name, self.spec, "consumer")

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
    keys = data.access
    if data.spec.mode == "offline":
        source.update(kind="disk", path=common.SHARDS_DIR)
    else:
        source.update(kind="zmq", url=data.url, **keys.settings)
    config = {
        **spec.model_dump(mode="json", include=fields, exclude_none=True),
        "verifier": verifier_of(spec, data).model_dump(mode="json", exclude_none=True),
        "data": source,
        "output_dir": common.OUTPUT_ROOT,
        "allowed_roots": [*common.pod_roots(spec.pod), *keys.roots],
        "device": "auto",
        "resume": "auto",
        "metrics": {"port": common.METRICS_PORT},  # bound to the pod's IP by the container's args
    }
    return load_config(TrainConfig, config)


def model_cache(cr: SpeculatorTraining, data: DataSource, *, fetched: bool = False) -> ModelCache | None:
    """The trainer's and evaluator's model cache: the inline child DataGen's (filled when its
    `ModelCached` is True), or this training's own (`fetched`: its download succeeded)."""
    spec = cr.spec
    if spec.model_cache is None:
        return None
    if spec.data_gen is not None:
        claim = CacheNames.of(DATAGEN_KIND, data.names.name).claim_for(spec.model_cache)
        return ModelCache(claim, is_true(data.conditions, "ModelCached"))
    return ModelCache(CacheNames.of(TRAINING_KIND, cr.metadata.name).claim_for(spec.model_cache), fetched)


def procs_per_node(spec: SpeculatorTrainingSpec) -> int:
    return spec.procs_per_node or max(1, spec.pod.resources.gpus())


def _volumes(
    spec: SpeculatorTrainingSpec, names: TrainingNames, data: DataSource, cache: ModelCache | None
) -> tuple[list[Manifest], list[Manifest], list[Manifest]]:
    """(volumes, mounts, env) of trainer and evaluator pods: output, data and model cache."""
    output_volume, output_mount = common.claim_volume("output", names.claim_for(spec), common.OUTPUT_ROOT)
    volumes, mounts = [output_volume], [output_mount]
    if data.spec.mode == "offline":
        data_volume, data_mount = common.claim_volume("data", data.claim, common.DATA_ROOT, read_only=True)
        volumes.append(data_volume)
        mounts.append(data_mount)
    cache_volumes, cache_mounts, cache_env = reader_parts(cache)
    return [*volumes, *cache_volumes], [*mounts, *cache_mounts], cache_env


def rendezvous_env(
    spec: SpeculatorTrainingSpec, names: TrainingNames, uid: str, attempt: int
) -> list[Manifest]:
    """torchrun's settings (`PET_*` = its flags): a c10d rendezvous hosted by index 0 that waits
    `rendezvousTimeoutSeconds` for every node (and for index 0's store to come up, `read_timeout`)
    so slow scheduling and image pulls are no failure; an id per attempt, so ranks of a restarted
    group never meet a stale one; no restarts inside torchrun (the operator restarts the group).
    Each node names itself by its Service DNS name (`local_addr`; the `$(...)` is expanded by the
    kubelet): rank 0 hands that name to the workers, which `socket.getfqdn()` would not reliably
    give, and c10d numbers nodes in their names' sort order, which puts index 0 first: global
    rank 0 (checkpoints, the report status reads) runs in pod index 0."""
    timeout = spec.trainer.rendezvous_timeout_seconds
    settings = [
        ("PET_NNODES", str(spec.nodes)),
        ("PET_NPROC_PER_NODE", str(procs_per_node(spec))),
        ("PET_RDZV_BACKEND", "c10d"),
        ("PET_RDZV_ENDPOINT", names.rendezvous_endpoint),
        ("PET_RDZV_ID", f"{uid}-{attempt}"),
        ("PET_RDZV_CONF", f"join_timeout={timeout},read_timeout={timeout}"),
        ("PET_LOCAL_ADDR", names.node_addr("$(JOB_COMPLETION_INDEX)")),
        ("PET_MAX_RESTARTS", "0"),
    ]
    return [{"name": k, "value": v} for k, v in settings]


def _trainer_job(
    cr: SpeculatorTraining,
    owner: Owner,
    names: TrainingNames,
    data: DataSource,
    defaults: Defaults,
    cache: ModelCache | None,
    attempt: int,
) -> Manifest:
    spec = cr.spec
    config_volume, config_mount = common.config_volume(names.config)
    volumes, mounts, cache_env = _volumes(spec, names, data, cache)
    keys = data.access
    parts = PodParts(
        component=TRAINER,
        args=[
            *("torchrun", "--module", "specops.cli", "train", "--config", common.CONFIG_FILE),
            *common.METRICS_ARGS,  # one config for all ranks; each pod has its own IP
        ],
        env=[
            common.index_env("JOB_COMPLETION_INDEX"),
            common.POD_IP_ENV,
            *rendezvous_env(spec, names, owner.uid, attempt),
            *cache_env,
        ],
        volumes=[config_volume, *volumes, *keys.volumes],
        mounts=[config_mount, *mounts, *keys.mounts],
        resources=spec.pod.resources,
        ports=(
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            common.METRICS_CONTAINER_PORT,
        ),
        subdomain=names.service,
        labels=keys.labels,
    )
    job = common.job(
        owner,
        names.job,
        TRAINER,
        common.pod_template(owner, spec.pod, defaults, parts),
        completions=spec.nodes,
        parallelism=spec.nodes,
        suspend=spec.suspend,
        backoff={"backoffLimit": 0},
        deadline=spec.active_deadline_seconds,
        ttl=spec.ttl_seconds_after_finished,
        policy=common.failure_policy(ignore_disruptions=False),
    )
    job["metadata"]["annotations"] = {ATTEMPT_ANNOTATION: str(attempt)}
    return job


def attempt_of(job: Manifest | None) -> int:
    """The attempt a trainer Job runs (0 for one made before attempts were numbered)."""
    annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
    raw = str(annotations.get(ATTEMPT_ANNOTATION) or "0")
    return int(raw) if raw.isdigit() else 0


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
    cr: SpeculatorTraining,
    owner: Owner,
    names: TrainingNames,
    data: DataSource,
    defaults: Defaults,
    cache: ModelCache | None,
) -> Manifest:
    spec = cr.spec
    verifier = verifier_of(spec, data)
    config_volume, config_mount = common.config_volume(names.config)
    volumes, mounts, cache_env = _volumes(spec, names, data, cache)
    # The trainer's own config: the evaluator reads the same data.path, validationFraction and
    # seed, so it evaluates exactly the conversations the training held out (specops.data.split).
    args = [
        "specops",
        "evaluate",
        "--speculator",
        FINAL_DIR,
        "--verifier",
        verifier.name_or_path,
        "--train-config",
        common.CONFIG_FILE,
        "--max-prompts",
        str(spec.evaluation.max_prompts),
        "--max-new-tokens",
        str(spec.evaluation.max_new_tokens),
        "--output",
        EVALUATION_FILE,
    ]
    if verifier.gguf_file:
        args += ["--gguf-file", verifier.gguf_file]
    if spec.evaluation.max_mismatch_rate is not None:
        args += ["--max-mismatch-rate", str(spec.evaluation.max_mismatch_rate)]
    for root in common.pod_roots(spec.pod):
        args += ["--allowed-root", root]
    parts = PodParts(
        component=EVALUATOR,
        args=args,
        env=cache_env,
        volumes=[config_volume, *volumes],
        mounts=[config_mount, *mounts],
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
    if cr.spec.model_cache is not None:  # the child downloads it; trainer and evaluator read its claim
        spec["modelCache"] = cr.spec.model_cache.model_dump(mode="json", by_alias=True, exclude_unset=True)
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


def evaluation_skipped(spec: SpeculatorTrainingSpec, data: DataSource) -> str | None:
    """Why no evaluation Job runs (a condition reason), or None when one does."""
    if not spec.evaluation.enabled:
        return "Disabled"
    if data.spec.mode != "offline":
        return "NoPromptData"
    if spec.data.validation_fraction <= 0:
        return "NoHeldOutData"
    return None


def build_training(
    cr: SpeculatorTraining,
    defaults: Defaults,
    data: DataSource,
    *,
    trained: bool,
    fetched: bool = False,
    attempt: int | None = 0,
    evaluated: bool = False,
) -> list[Manifest]:
    """The children this training needs now, in creation order. `fetched`: its own model cache
    download succeeded; `attempt`: the trainer group to run (`status.trainer.restarts`), None while
    the failed one is being torn down; `evaluated`: the evaluation Job succeeded."""
    owner = Owner.of(cr)
    names = TrainingNames(owner.name, owner.namespace)
    spec = cr.spec
    children: list[Manifest] = []
    if spec.data_gen is not None:
        children.append(child_datagen(cr, names))
    children.append(common.config_map(owner, names.config, dump_config(render_config(spec, data))))
    if spec.storage.size is not None:
        children.append(common.claim(owner, names.claim, "output", spec.storage.size, spec.storage))
    if spec.model_cache is not None and spec.data_gen is None:
        verifier = verifier_of(spec, data)
        suspend, ttl = spec.suspend, spec.ttl_seconds_after_finished
        children += build_cache(
            owner, spec.model_cache, verifier, spec.pod, defaults, suspend=suspend, ttl=ttl
        )
    children.append(_service(owner, names))
    cache = model_cache(cr, data, fetched=fetched)
    if data.ready and (cache is None or cache.ready) and attempt is not None:
        children.append(_trainer_job(cr, owner, names, data, defaults, cache, attempt))
    skipped = evaluation_skipped(spec, data) is not None
    if trained and not skipped:
        children.append(_eval_job(cr, owner, names, data, defaults, cache))
    if spec.export is not None and trained and (skipped or evaluated):
        children.append(upload_job(cr, defaults, evaluated=not skipped))
    return children


def upload_job(cr: SpeculatorTraining, defaults: Defaults, *, evaluated: bool) -> Manifest:
    """`spec.export`'s upload Job (`evaluated`: the model card gets the evaluation's report). It
    needs nothing of the data, so a completed run uploads again after its DataGen is gone."""
    owner = Owner.of(cr)
    names = TrainingNames(owner.name, owner.namespace)
    spec = cr.spec
    assert spec.export is not None
    return publish.publish_job(
        owner,
        names.publish_job,
        names.claim_for(spec),
        spec.export,
        spec.pod,
        defaults,
        speculator=FINAL_DIR,
        evaluation=EVALUATION_FILE if evaluated else None,
        key=publish.UploadKey.of(spec.export, cr.metadata.annotations),
        suspend=spec.suspend,
        deadline=spec.active_deadline_seconds,
        ttl=spec.ttl_seconds_after_finished,
    )
