"""SpeculatorDataGen -> children.

offline: ConfigMap (rendered DataGenConfig) + PVC (shards) + Indexed Job (one completion per shard).
online:  ConfigMap + broker StatefulSet + Service + generator Indexed Job producing into the broker.
With `modelCache`: its claim and download Job first; the generator Job once the download succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specops.config import DataGenConfig, dump_config, load_config
from specops_operator.api import DATAGEN_KIND, SpeculatorDataGen, SpeculatorDataGenSpec
from specops_operator.builders import common, stream
from specops_operator.builders.common import Defaults, Manifest, Owner, PodParts
from specops_operator.builders.modelcache import CacheNames, ModelCache, build_cache, reader_parts

GENERATOR = "generator"
BROKER = "broker"
BROKER_STATE = "/state"


@dataclass(frozen=True)
class DataGenNames:
    """Child names of one SpeculatorDataGen (also used by trainings that read its data)."""

    name: str
    namespace: str

    @property
    def config(self) -> str:
        return f"{self.name}-gen"

    @property
    def job(self) -> str:
        return f"{self.name}-gen"

    @property
    def claim(self) -> str:
        return f"{self.name}-data"

    @property
    def broker(self) -> str:
        return f"{self.name}-broker"

    def claim_for(self, spec: SpeculatorDataGenSpec) -> str:
        return spec.storage.existing_claim if spec.storage and spec.storage.existing_claim else self.claim

    def broker_url(self, spec: SpeculatorDataGenSpec) -> str:
        return f"tcp://{self.broker}.{self.namespace}.svc:{spec.broker.port}"


def workload_fields(spec: SpeculatorDataGenSpec) -> dict[str, Any]:
    """The DataGenConfig parts of the spec, as wire data."""
    fields = set(DataGenConfig.model_fields) & set(type(spec).model_fields)
    return spec.model_dump(mode="json", include=fields, exclude_none=True)


def render_config(spec: SpeculatorDataGenSpec, names: DataGenNames) -> DataGenConfig:
    """The DataGenConfig every generator pod reads; raises ConfigError naming the field."""
    sync: dict[str, Any] = spec.sync.model_dump(mode="json")
    keys = stream.access(names.name, spec, "producer")
    if spec.mode == "offline":
        sync.update(kind="disk", path=common.SHARDS_DIR)
    else:
        sync.update(kind="zmq", url=names.broker_url(spec), **keys.settings)
    roots = [*common.pod_roots(spec.pod), *keys.roots]
    data = {
        **workload_fields(spec),
        "sync": sync,
        "run": {"num_workers": 1, "num_shards": spec.shards, "allowed_roots": roots},
        "metrics": {"port": common.METRICS_PORT},  # bound to the pod's IP by the container's args
    }
    return load_config(DataGenConfig, data)


def model_cache(spec: SpeculatorDataGenSpec, names: DataGenNames, *, ready: bool) -> ModelCache | None:
    """The generators' model cache (`ready`: its download succeeded), None without `modelCache`."""
    if spec.model_cache is None:
        return None
    return ModelCache(CacheNames.of(DATAGEN_KIND, names.name).claim_for(spec.model_cache), ready)


def _generator_job(
    cr: SpeculatorDataGen, owner: Owner, names: DataGenNames, defaults: Defaults, cache: ModelCache | None
) -> Manifest:
    spec = cr.spec
    config_volume, config_mount = common.config_volume(names.config)
    keys = stream.access(names.name, spec, "producer")
    cache_volumes, cache_mounts, cache_env = reader_parts(cache)
    volumes = [config_volume, *keys.volumes, *cache_volumes]
    mounts = [config_mount, *keys.mounts, *cache_mounts]
    if spec.mode == "offline":
        data_volume, data_mount = common.claim_volume("data", names.claim_for(spec), common.DATA_ROOT)
        volumes.append(data_volume)
        mounts.append(data_mount)
    parts = PodParts(
        component=GENERATOR,
        args=[
            "specops",
            "generate-data",
            "--config",
            common.CONFIG_FILE,
            "--run.shard_index",
            "$(JOB_COMPLETION_INDEX)",
            *common.METRICS_ARGS,
        ],
        env=[common.index_env("JOB_COMPLETION_INDEX"), common.POD_IP_ENV, *cache_env],
        volumes=volumes,
        mounts=mounts,
        resources=spec.pod.resources,
        ports=(common.METRICS_CONTAINER_PORT,),
        labels=keys.labels,
    )
    return common.job(
        owner,
        names.job,
        GENERATOR,
        common.pod_template(owner, spec.pod, defaults, parts),
        completions=spec.shards,
        parallelism=spec.workers,
        suspend=spec.suspend,
        backoff={"backoffLimitPerIndex": spec.backoff_limit_per_index},
        deadline=spec.active_deadline_seconds,
        ttl=spec.ttl_seconds_after_finished,
    )


def _broker(cr: SpeculatorDataGen, owner: Owner, names: DataGenNames, defaults: Defaults) -> list[Manifest]:
    spec = cr.spec
    ports = (
        {"name": "zmq", "containerPort": spec.broker.port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": spec.broker.metrics_port, "protocol": "TCP"},
    )
    keys = stream.access(names.name, spec, "broker")
    parts = PodParts(
        component=BROKER,
        args=[
            "specops",
            "broker",
            "--bind",
            f"tcp://0.0.0.0:{spec.broker.port}",
            "--max-bytes",
            str(spec.sync.max_broker_bytes),
            "--metrics-port",
            str(spec.broker.metrics_port),
            "--state-dir",
            BROKER_STATE,
            "--allowed-root",
            BROKER_STATE,
            *keys.args,
        ],
        env=[],
        # The journal outlives container restarts, so a restarted broker continues the stream.
        volumes=[{"name": "state", "emptyDir": {"sizeLimit": "1Gi"}}, *keys.volumes],
        mounts=[{"name": "state", "mountPath": BROKER_STATE}, *keys.mounts],
        resources=spec.broker.resources,
        report=False,
        ports=ports,
        restart_policy="Always",
        readiness={"tcpSocket": {"port": "zmq"}, "periodSeconds": 5},
    )
    selector = common.selector_labels(owner, BROKER)
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": common.metadata(owner, names.broker, BROKER),
        "spec": {
            # Suspended = no pods at all; producers keep unacked work and regenerate it on resume.
            "replicas": 0 if spec.suspend else 1,
            "serviceName": names.broker,
            "selector": {"matchLabels": selector},
            "template": common.pod_template(owner, common.support_pod(spec.pod), defaults, parts),
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(owner, names.broker, BROKER),
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "zmq", "port": spec.broker.port, "targetPort": "zmq", "protocol": "TCP"},
                {
                    "name": "metrics",
                    "port": spec.broker.metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
            ],
        },
    }
    return [statefulset, service, stream.network_policy(owner, spec, selector, defaults.metrics_from)]


def build_datagen(cr: SpeculatorDataGen, defaults: Defaults, *, cache_ready: bool = False) -> list[Manifest]:
    """The children of a SpeculatorDataGen needed now, in creation order (config and storage before
    pods); `cache_ready`: the `modelCache` download succeeded, so the generators may start."""
    owner = Owner.of(cr)
    names = DataGenNames(owner.name, owner.namespace)
    spec = cr.spec
    children = [common.config_map(owner, names.config, dump_config(render_config(spec, names)))]
    if spec.mode == "offline":
        assert spec.storage is not None  # the model requires storage for mode offline
        if spec.storage.size is not None:
            children.append(common.claim(owner, names.claim, "data", spec.storage.size, spec.storage))
    else:
        children.extend(_broker(cr, owner, names, defaults))
    if spec.model_cache is not None:
        children += build_cache(
            owner,
            spec.model_cache,
            spec.verifier,
            spec.pod,
            defaults,
            suspend=spec.suspend,
            ttl=spec.ttl_seconds_after_finished,
        )
    cache = model_cache(spec, names, ready=cache_ready)
    if cache is None or cache.ready:
        children.append(_generator_job(cr, owner, names, defaults, cache))
    return children
