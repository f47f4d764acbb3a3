"""Builders: golden manifests that Kubernetes 1.30 and 1.34 accept (`kubernetes-validate --strict`),
and the properties every child must have (owners, labels, security, Kueue, suspend, configs)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from _operator_support import ROOT, server_errors

from specops.config import DataGenConfig, TrainConfig, load_config
from specops_operator.api import SpeculatorDataGen, load_resources
from specops_operator.builders.common import Defaults
from specops_operator.builders.datagen import DataGenNames, build_datagen
from specops_operator.builders.drift import (
    Ownership,
    adoption_patch,
    mutable_patch,
    ownership,
    queued_scaling,
    workload_patch,
)
from specops_operator.builders.training import DataSource, build_training, inline_source

GOLDEN = Path(__file__).parent / "golden" / "operator"
UPDATE = os.environ.get("SPECOPS_UPDATE_GOLDEN") == "1"
DEFAULTS = Defaults(image="registry.example/specops/workload:1.0")
COMPLETE = {
    "conditions": [
        {"type": "ShardsComplete", "status": "True"},
        {"type": "StreamConnected", "status": "True"},
    ]
}
Manifest = dict[str, Any]


def _load(name: str, index: int = 0, labels: dict[str, str] | None = None) -> Any:
    resource = load_resources((ROOT / "examples" / name).read_text(), name)[index]
    resource.metadata.namespace = "ml"
    resource.metadata.uid = f"uid-{resource.metadata.name}"
    resource.metadata.labels.update(labels or {})
    return resource


def _source(name: str, index: int = 0, status: dict[str, Any] | None = None) -> DataSource:
    datagen = _load(name, index)
    assert isinstance(datagen, SpeculatorDataGen)
    return DataSource(DataGenNames(datagen.metadata.name, "ml"), datagen.spec, status or {})


def _cases() -> dict[str, list[Manifest]]:
    eagle3 = _load("eagle3-train.yaml")
    hass = _load("hass-train.yaml")
    online = _load("datagen-online.yaml", 1)
    return {
        "datagen-offline": build_datagen(_load("datagen-offline.yaml"), DEFAULTS),
        "datagen-online": build_datagen(_load("datagen-online.yaml"), DEFAULTS),
        "training-eagle3": build_training(eagle3, DEFAULTS, inline_source(eagle3, COMPLETE), trained=True),
        "training-hass": build_training(
            hass, DEFAULTS, _source("datagen-offline.yaml", status=COMPLETE), trained=False
        ),
        "training-online": build_training(
            online, DEFAULTS, _source("datagen-online.yaml", status=COMPLETE), trained=True
        ),
    }


CASES = _cases()


def _without_rendered_config(manifests: list[Manifest]) -> list[Manifest]:
    """Goldens pin the manifests; the rendered workload config is checked field by field below, so
    a new config.py default does not churn every golden."""
    out = copy.deepcopy(manifests)
    for manifest in out:
        if manifest["kind"] == "ConfigMap":
            manifest["data"]["config.yaml"] = "<rendered workload config>"
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    path = GOLDEN / f"{case}.yaml"
    text = yaml.safe_dump_all(_without_rendered_config(CASES[case]), sort_keys=True, width=120)
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with SPECOPS_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path.name} (SPECOPS_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("version", ["1.30", "1.34"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kubernetes_accepts_every_child(case: str, version: str) -> None:
    for manifest in CASES[case]:
        if manifest["apiVersion"].startswith("specops.dev/"):
            assert server_errors(manifest) == [], manifest["metadata"]["name"]
        else:
            kubernetes_validate.validate(manifest, version, strict=True)


def _all() -> list[Manifest]:
    return [m for manifests in CASES.values() for m in manifests]


def test_every_child_is_labelled_and_owned() -> None:
    for manifest in _all():
        meta = manifest["metadata"]
        assert meta["namespace"] == "ml"
        labels = meta["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "specops-operator"
        assert labels["app.kubernetes.io/part-of"] == "specops"
        assert {"app.kubernetes.io/instance", "app.kubernetes.io/component", "specops.dev/kind"} <= set(
            labels
        )
        if manifest["kind"] == "PersistentVolumeClaim":
            assert "ownerReferences" not in meta  # storage.retain defaults to true
        else:
            (ref,) = meta["ownerReferences"]
            assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
            assert ref["uid"] == f"uid-{labels['app.kubernetes.io/instance']}"


def _pods() -> list[tuple[str, Manifest]]:
    out = []
    for manifest in _all():
        if manifest["kind"] in ("Job", "StatefulSet"):
            out.append((manifest["metadata"]["name"], manifest["spec"]["template"]["spec"]))
    return out


def test_pods_are_hardened() -> None:
    for name, pod in _pods():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False, f"{name}: workload pods need no API token"
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/dev/shm", "/tmp", "/cache"} <= mounts


def test_volume_ownership_is_changed_only_when_the_root_needs_it() -> None:
    """Without fsGroupChangePolicy the kubelet chowns every file of a TiB volume at each pod start."""
    for name, pod in _pods():
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", name
        assert "terminationGracePeriodSeconds" not in pod and "schedulerName" not in pod


GPU_PLATFORM_POD = {
    "terminationGracePeriodSeconds": 900,
    "runAsUser": 2000,
    "runAsGroup": 3000,
    "fsGroup": 4000,
    "fsGroupChangePolicy": "Always",
    "ipcLock": True,
    "schedulerName": "volcano",
    "envFrom": [{"secretRef": {"name": "tracking"}, "prefix": "WANDB_"}, {"configMapRef": {"name": "nccl"}}],
    "volumes": [
        {"name": "weights", "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True}}
    ],
    "volumeMounts": [{"name": "weights", "mountPath": "/models", "readOnly": True}],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "trainer"}},
        }
    ],
}


def _platform_training() -> list[Manifest]:
    hass = _load("hass-train.yaml")
    hass.spec.pod = type(hass.spec.pod).model_validate(
        {**hass.spec.pod.model_dump(by_alias=True), **GPU_PLATFORM_POD}
    )
    return build_training(hass, DEFAULTS, _source("datagen-offline.yaml", status=COMPLETE), trained=True)


def test_gpu_platform_pod_knobs_reach_every_workload_pod() -> None:
    children = _platform_training()
    jobs = [m for m in children if m["kind"] == "Job"]
    assert len(jobs) == 2
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 900 and pod["schedulerName"] == "volcano"
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 2000,
            "runAsGroup": 3000,
            "fsGroup": 4000,
            "fsGroupChangePolicy": "Always",
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert pod["topologySpreadConstraints"] == GPU_PLATFORM_POD["topologySpreadConstraints"]
        assert pod["volumes"][-1] == GPU_PLATFORM_POD["volumes"][0]
        (container,) = pod["containers"]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert container["envFrom"] == [
            {"secretRef": {"name": "tracking", "optional": False}, "prefix": "WANDB_"},
            {"configMapRef": {"name": "nccl", "optional": False}},
        ]
        assert container["volumeMounts"][-1] == {"name": "weights", "mountPath": "/models", "readOnly": True}


@pytest.mark.parametrize("version", ["1.30", "1.34"])
def test_kubernetes_accepts_the_gpu_platform_pods(version: str) -> None:
    for manifest in _platform_training():
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_broker_takes_the_ids_but_not_the_gpu_knobs() -> None:
    online = _load("datagen-online.yaml")
    online.spec.pod = type(online.spec.pod).model_validate(
        {**online.spec.pod.model_dump(by_alias=True), **GPU_PLATFORM_POD}
    )
    broker = next(m for m in build_datagen(online, DEFAULTS) if m["kind"] == "StatefulSet")
    pod = broker["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 2000 and pod["securityContext"]["fsGroup"] == 4000
    assert "schedulerName" not in pod and "envFrom" not in pod["containers"][0]
    assert {v["name"] for v in pod["volumes"]} == {"state", "stream-keys", "tmp", "cache", "dshm"}


def test_claim_volumes_say_read_only_only_when_it_is_true() -> None:
    """The API server drops `readOnly: false` (seen in e2e): a child must read back as built."""
    claims = [
        (name, volume["persistentVolumeClaim"])
        for name, pod in _pods()
        for volume in pod["volumes"]
        if "persistentVolumeClaim" in volume
    ]
    assert any("readOnly" in claim for _, claim in claims), "some pod mounts its data read-only"
    assert any("readOnly" not in claim for _, claim in claims), "some pod writes to its claim"
    for name, claim in claims:
        assert claim.get("readOnly", True) is True, f"{name}: {claim}"


def _job(case: str, suffix: str) -> Manifest:
    return next(m for m in CASES[case] if m["kind"] == "Job" and m["metadata"]["name"].endswith(suffix))


def test_offline_generator_job() -> None:
    job = _job("datagen-offline", "-gen")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == (8, 2, 2)
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["python", "-m", "specops_operator.report", "--"]
    assert container["command"][4:] == [
        "specops",
        "generate-data",
        "--config",
        "/etc/specops/config.yaml",
        "--run.shard_index",
        "$(JOB_COMPLETION_INDEX)",
        *("--metrics.host", "$(POD_IP)"),  # each generator's progress on its pod's own IP
    ]
    assert [e["name"] for e in container["env"][:2]] == ["JOB_COMPLETION_INDEX", "POD_IP"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    config = yaml.safe_load(
        next(m for m in CASES["datagen-offline"] if m["kind"] == "ConfigMap")["data"]["config.yaml"]
    )
    assert config["metrics"] == {"port": 9400, "host": "127.0.0.1"}  # the args bind it to the pod IP
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_job_fails_at_once_on_the_fatal_exit_codes_only() -> None:
    """The exit-code contract: 2 config, 3 data, 4 evaluation verdict end the Job; 1 (a crash) and
    143 (SIGTERM) are retried, also for the evaluator (whose exit 1 used to be terminal). The
    trainer Job retries nothing itself: its first failed pod (an evicted one too) ends it, and the
    operator restarts the whole torchrun group."""
    jobs = [m for m in _all() if m["kind"] == "Job"]
    assert {m["metadata"]["name"].rsplit("-", 1)[-1] for m in jobs} == {"gen", "train", "eval"}
    for job in jobs:
        fail_fast, *rest = job["spec"]["podFailurePolicy"]["rules"]
        assert fail_fast == {
            "action": "FailJob",
            "onExitCodes": {"containerName": "workload", "operator": "In", "values": [2, 3, 4]},
        }, job["metadata"]["name"]
        if job["metadata"]["name"].endswith("-train"):
            assert rest == [] and job["spec"]["backoffLimit"] == 0
        else:
            assert [r["action"] for r in rest] == ["Ignore"]


def test_rendered_configs_are_valid_workload_configs() -> None:
    offline = load_config(DataGenConfig, yaml.safe_load(CASES["datagen-offline"][0]["data"]["config.yaml"]))
    assert (offline.sync.kind, offline.sync.path, offline.run.num_shards) == ("disk", "/data/shards", 8)
    assert offline.run.allowed_roots == ["/data", "/output", "/cache"]
    online = load_config(DataGenConfig, yaml.safe_load(CASES["datagen-online"][0]["data"]["config.yaml"]))
    assert online.sync.url == "tcp://llama32-1b-online-broker.ml.svc:5555"
    config_map = next(m for m in CASES["training-eagle3"] if m["kind"] == "ConfigMap")
    train = load_config(TrainConfig, yaml.safe_load(config_map["data"]["config.yaml"]))
    assert train.verifier.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert (train.data.kind, train.data.path, train.output_dir) == ("disk", "/data/shards", "/output")
    assert train.distributed == "fsdp" and train.epochs == 10
    config_map = next(m for m in CASES["training-online"] if m["kind"] == "ConfigMap")
    train = load_config(TrainConfig, yaml.safe_load(config_map["data"]["config.yaml"]))
    assert (train.data.kind, train.max_steps) == ("zmq", 20000)


def test_trainer_job_has_torchrun_rendezvous() -> None:
    job = _job("training-hass", "-train")
    pod = job["spec"]["template"]["spec"]
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    assert pod["subdomain"] == "qwen3-8b-hass-train"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4"
    # c10d: index 0 hosts the store; every node waits for the others as long as scheduling may take.
    assert env["PET_RDZV_BACKEND"] == "c10d" and env["PET_MAX_RESTARTS"] == "0"
    assert env["PET_RDZV_ENDPOINT"] == "qwen3-8b-hass-train-0.qwen3-8b-hass-train:29500"
    assert env["PET_RDZV_CONF"] == "join_timeout=900,read_timeout=900"
    assert env["PET_RDZV_ID"] == "uid-qwen3-8b-hass-0"
    # Each node advertises its Service DNS name (rank 0's is what the workers connect to).
    assert env["PET_LOCAL_ADDR"] == "qwen3-8b-hass-train-$(JOB_COMPLETION_INDEX).qwen3-8b-hass-train"
    assert pod["containers"][0]["env"][0]["name"] == "JOB_COMPLETION_INDEX"  # defined before its use
    assert job["metadata"]["annotations"] == {"specops.dev/attempt": "0"}
    service = next(m for m in CASES["training-hass"] if m["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "qwen3-8b-sharegpt-data",
        "readOnly": True,
    }


def test_each_attempt_has_its_own_rendezvous_and_none_runs_while_one_is_torn_down() -> None:
    hass = _load("hass-train.yaml")
    hass.spec.trainer.rendezvous_timeout_seconds = 3600
    source = _source("datagen-offline.yaml", status=COMPLETE)
    third = next(
        m for m in build_training(hass, DEFAULTS, source, trained=False, attempt=2) if m["kind"] == "Job"
    )
    env = {e["name"]: e.get("value") for e in third["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        env["PET_RDZV_ID"] == "uid-qwen3-8b-hass-2"
        and third["metadata"]["annotations"]["specops.dev/attempt"] == "2"
    )
    assert env["PET_RDZV_CONF"] == "join_timeout=3600,read_timeout=3600"
    tearing_down = build_training(hass, DEFAULTS, source, trained=False, attempt=None)
    assert "Job" not in [m["kind"] for m in tearing_down]


def test_stages_follow_the_data() -> None:
    hass = _load("hass-train.yaml")
    waiting = build_training(hass, DEFAULTS, _source("datagen-offline.yaml"), trained=False)
    assert [m["kind"] for m in waiting] == ["ConfigMap", "PersistentVolumeClaim", "Service"]
    kinds = [m["metadata"]["name"] for m in CASES["training-hass"]]
    assert "qwen3-8b-hass-train" in kinds and "qwen3-8b-hass-eval" not in kinds
    online = [m["metadata"]["name"] for m in CASES["training-online"] if m["kind"] == "Job"]
    assert online == ["llama32-1b-online-train"]  # no prompts on disk: no evaluation Job
    pod = _job("training-online", "-train")["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}


def test_inline_generation_is_a_child_resource_that_inherits_suspend_and_queue() -> None:
    eagle3 = _load("eagle3-train.yaml", labels={"kueue.x-k8s.io/queue-name": "gpu-queue"})
    eagle3.spec.suspend = True
    children = build_training(eagle3, DEFAULTS, inline_source(eagle3, None), trained=False)
    child = children[0]
    assert child["kind"] == "SpeculatorDataGen" and child["metadata"]["name"] == "llama31-8b-eagle3-data"
    assert child["spec"]["suspend"] is True
    assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert server_errors(child) == []


def test_kueue_and_suspend_reach_the_jobs() -> None:
    queued = build_datagen(
        _load("datagen-offline.yaml", labels={"kueue.x-k8s.io/queue-name": "gpus"}), DEFAULTS
    )
    job = next(m for m in queued if m["kind"] == "Job")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert (
        "kueue.x-k8s.io/queue-name"
        not in next(m for m in queued if m["kind"] == "ConfigMap")["metadata"]["labels"]
    )
    plain = _job("datagen-offline", "-gen")
    assert plain["spec"]["suspend"] is False
    suspended = _load("datagen-online.yaml")
    suspended.spec.suspend = True
    manifests = build_datagen(suspended, DEFAULTS)
    assert next(m for m in manifests if m["kind"] == "StatefulSet")["spec"]["replicas"] == 0
    assert next(m for m in manifests if m["kind"] == "Job")["spec"]["suspend"] is True


def test_broker_does_not_inherit_gpu_scheduling() -> None:
    broker = next(m for m in CASES["datagen-online"] if m["kind"] == "StatefulSet")
    pod = broker["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])
    assert pod["restartPolicy"] == "Always"
    assert pod["containers"][0]["command"][:2] == ["specops", "broker"]


def test_existing_claims_are_used_not_created() -> None:
    hass = _load("hass-train.yaml")
    hass.spec.storage = hass.spec.storage.model_copy(update={"size": None, "existing_claim": "models"})
    children = build_training(hass, DEFAULTS, _source("datagen-offline.yaml", status=COMPLETE), trained=False)
    assert "PersistentVolumeClaim" not in [m["kind"] for m in children]
    job = next(m for m in children if m["kind"] == "Job")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"]["claimName"] == "models"


def test_retain_false_claims_are_owned() -> None:
    cr = _load("datagen-offline.yaml")
    assert isinstance(cr, SpeculatorDataGen) and cr.spec.storage is not None
    cr.spec.storage.retain = False
    claim = next(m for m in build_datagen(cr, DEFAULTS) if m["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-qwen3-8b-sharegpt"


def test_missing_uid_is_refused() -> None:
    cr = _load("datagen-offline.yaml")
    cr.metadata.uid = None
    with pytest.raises(ValueError, match=r"metadata\.namespace and metadata\.uid are required"):
        build_datagen(cr, DEFAULTS)


# --------------------------------------------------------------------------- drift


def _job_manifest(**labels: str) -> Manifest:
    return copy.deepcopy(_job("datagen-offline", "-gen")) | {
        "metadata": {
            **_job("datagen-offline", "-gen")["metadata"],
            "labels": {**_job("datagen-offline", "-gen")["metadata"]["labels"], **labels},
        }
    }


def test_ownership_is_strict() -> None:
    desired = _job_manifest()
    ours = copy.deepcopy(desired)
    assert ownership(ours, desired, "uid-qwen3-8b-sharegpt") is Ownership.OURS
    theirs = copy.deepcopy(desired)
    theirs["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    assert ownership(theirs, desired, "uid-qwen3-8b-sharegpt") is Ownership.CONFLICT
    orphan = copy.deepcopy(desired)
    del orphan["metadata"]["ownerReferences"]
    assert ownership(orphan, desired, "uid-qwen3-8b-sharegpt") is Ownership.ADOPT
    assert adoption_patch(desired) == {
        "metadata": {"ownerReferences": desired["metadata"]["ownerReferences"]}
    }
    stranger = {"metadata": {"name": desired["metadata"]["name"], "labels": {"app": "other"}}}
    assert ownership(stranger, desired, "uid-qwen3-8b-sharegpt") is Ownership.CONFLICT


def test_mutable_patch_touches_only_the_knobs() -> None:
    desired = _job_manifest()
    existing = copy.deepcopy(desired)
    existing["spec"]["parallelism"] = 1
    existing["spec"]["template"]["spec"]["containers"][0]["image"] = "drifted"
    assert mutable_patch(existing, desired) == {"spec": {"parallelism": 2}}
    assert mutable_patch(desired, desired) == {}


def test_kueue_alone_flips_suspend_and_parallelism_of_queued_jobs() -> None:
    desired = _job_manifest(**{"kueue.x-k8s.io/queue-name": "gpus"})
    desired["spec"]["suspend"] = True
    admitted = copy.deepcopy(desired)
    admitted["spec"].update(suspend=False, parallelism=1)
    assert mutable_patch(admitted, desired) == {}  # Kueue admitted it: never re-suspended by us
    assert workload_patch({"spec": {"active": True}}, suspend=True) == {"spec": {"active": False}}
    assert workload_patch({"spec": {}}, suspend=False) == {}
    assert workload_patch({"spec": {"active": False}}, suspend=False) == {"spec": {"active": True}}


def test_scaling_a_queued_resource_is_refused_with_a_message() -> None:
    queued = {"kueue.x-k8s.io/queue-name": "gpus"}
    assert queued_scaling({"workers": 2}, {"workers": 2}, queued) == []
    assert queued_scaling({"workers": 2}, {"workers": 4}, {}) == []
    (message,) = queued_scaling({"workers": 2}, {"workers": 4}, queued)
    assert "queued in Kueue" in message and "'gpus'" in message
