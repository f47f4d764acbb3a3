"""The operator against a real API server and controller-manager (v1.20.2).

Fields added to Kubernetes after v1.20 (Indexed Jobs' completionMode, Job suspend,
podFailurePolicy, backoffLimitPerIndex, ...) are silently dropped by this server: the tests say
which, and tests/unit/test_operator_builders.py validates those fields against current
Kubernetes schemas instead. Without Indexed Jobs the fake kubelet stamps the completion-index
annotation a v1.21+ Job controller would set.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from _controlplane import ROOT, ControlPlane, FakeKubelet, OperatorProcess, until
from _resources import (
    apply,
    children,
    condition,
    example,
    is_true,
    pods_of,
    shard_report,
    small_datagen,
    status_of,
)

from specops_operator import API_VERSION
from specops_operator.api import SpeculatorDataGen, parse_resource
from specops_operator.builders.common import INSTANCE_LABEL, Defaults
from specops_operator.builders.datagen import DataGenNames, build_datagen
from specops_operator.builders.training import TrainingNames

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]
DATAGEN, TRAINING = "SpeculatorDataGen", "SpeculatorTraining"

DROPPED_BY_V1_20 = {
    "spec.completionMode",  # Indexed Jobs: v1.21
    "spec.suspend",  # Job suspend: v1.21
    "spec.podFailurePolicy",  # v1.25
    "spec.backoffLimitPerIndex",  # v1.28
    "spec.maxFailedIndexes",  # v1.28
    "spec.podReplacementPolicy",  # v1.28
    "spec.ttlSecondsAfterFinished",  # alpha (feature gate off) in v1.20
}
"""Job fields the v1.20 server drops; every other field we set must be read back unchanged."""


def missing_fields(desired: Any, actual: Any, path: str = "") -> list[str]:
    """Paths set in `desired` that the server's object lacks or holds with another value."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            child = f"{path}.{key}" if path else key
            out += [child] if key not in actual else missing_fields(value, actual[key], child)
        return out
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return [path]
        return [
            p
            for i, (d, a) in enumerate(zip(desired, actual, strict=True))
            for p in missing_fields(d, a, f"{path}[{i}]")
        ]
    # Quantities come back as strings (`nvidia.com/gpu: 1` -> "1").
    return [] if desired == actual or str(desired) == str(actual) else [f"{path} ({desired!r} != {actual!r})"]


def test_offline_datagen_children_progress_and_completion(
    control_plane: ControlPlane, operator: OperatorProcess, kubelet: FakeKubelet, ns: str
) -> None:
    plane, kube = control_plane, control_plane.kube()
    plane.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "datagen-offline.yaml"))
    cr = until(lambda: kube.get(API_VERSION, "SpeculatorDataGen", ns, "qwen3-8b-sharegpt"), what="the CR")
    names = DataGenNames("qwen3-8b-sharegpt", ns)
    until(lambda: kube.get("batch/v1", "Job", ns, names.job), what="the generator Job")

    parsed = parse_resource(cr)
    assert isinstance(parsed, SpeculatorDataGen)
    desired = build_datagen(parsed, Defaults(image="specops/workload:e2e"))
    assert {c["kind"] for c in desired} == {"ConfigMap", "PersistentVolumeClaim", "Job"}
    for child in desired:
        meta = child["metadata"]
        actual = kube.get(child["apiVersion"], child["kind"], ns, meta["name"])
        assert actual is not None, f"{child['kind']} {meta['name']} missing"
        missing = missing_fields(child, actual)
        if child["kind"] == "Job":
            missing = [p for p in missing if p not in DROPPED_BY_V1_20]
        assert not missing, f"{child['kind']} {meta['name']}: fields not on the server: {missing}"

    kubelet.drive(
        ns,
        {"job-name": names.job},
        lambda: is_true(plane, "SpeculatorDataGen", ns, names.name, "Complete"),
        shard_report,
    )
    waited = plane.kubectl(
        "wait", "-n", ns, "--for=condition=Complete", "--timeout=30s", f"speculatordatagen/{names.name}"
    )
    assert "condition met" in waited.stdout
    status = status_of(plane, "SpeculatorDataGen", ns, names.name)
    progress = status["progress"]
    assert progress["shardsDone"] == progress["shardsTotal"] == 8
    assert progress["examples"] == sum(10 + i for i in range(8))
    assert progress["tokens"] == 8000
    assert condition(status, "ShardsComplete")["status"] == "True"
    assert (
        condition(status, "Ready")["status"] == "True" and condition(status, "Stalled")["status"] == "False"
    )
    assert status["observedGeneration"] == cr["metadata"]["generation"]
    assert status["claimName"] == names.claim


def test_training_from_inline_generation_to_exported_artifact(
    control_plane: ControlPlane, operator: OperatorProcess, kubelet: FakeKubelet, ns: str
) -> None:
    """examples/eagle3-train.yaml: generation (a child SpeculatorDataGen), training, evaluation."""
    plane, kube = control_plane, control_plane.kube()
    cr = example("eagle3-train.yaml", "SpeculatorTraining")
    name = cr["metadata"]["name"]
    names = TrainingNames(name, ns)
    apply(plane, ns, cr)
    child = until(
        lambda: kube.get(API_VERSION, "SpeculatorDataGen", ns, names.datagen), what="the child DataGen"
    )
    training = kube.get(API_VERSION, "SpeculatorTraining", ns, name)
    assert training is not None
    (ref,) = child["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == (
        "SpeculatorTraining",
        training["metadata"]["uid"],
        True,
    )
    gen_job = DataGenNames(names.datagen, ns).job
    until(lambda: kube.get("batch/v1", "Job", ns, gen_job), what="the generator Job")
    assert kube.get("batch/v1", "Job", ns, names.job) is None, "training waits for the data"
    kubelet.drive(
        ns,
        {"job-name": gen_job},
        lambda: kube.get("batch/v1", "Job", ns, names.job),
        shard_report,
        timeout=60,
    )

    trainer = kube.get("batch/v1", "Job", ns, names.job)
    assert trainer is not None
    pod = trainer["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert kube.get("v1", "Service", ns, names.service) is not None, "torchrun rendezvous Service"
    report = {"step": 5000, "best_val_loss": 1.125}
    kubelet.drive(
        ns, {"job-name": names.job}, lambda: kube.get("batch/v1", "Job", ns, names.eval_job), lambda i: report
    )
    evaluation = {"acceptance_length": 2.75, "per_position": [0.8, 0.6, 0.4], "lossless": True, "prompts": 80}
    kubelet.drive(
        ns,
        {"job-name": names.eval_job},
        lambda: is_true(plane, "SpeculatorTraining", ns, name, "Complete"),
        lambda i: evaluation,
    )
    plane.kubectl("wait", "-n", ns, "--for=condition=Complete", "--timeout=30s", f"speculatortraining/{name}")
    status = status_of(plane, "SpeculatorTraining", ns, name)
    assert status["progress"]["step"] == 5000 and status["progress"]["bestValLoss"] == 1.125
    assert status["evaluation"]["acceptanceLength"] == 2.75
    assert status["artifact"]["vllmServeCommand"].startswith("vllm serve meta-llama/Llama-3.1-8B-Instruct")
    for type_ in ("Exported", "Evaluated", "Ready"):
        assert condition(status, type_)["status"] == "True", type_
    row = plane.kubectl("get", "speculatortrainings", "-n", ns, "--no-headers").stdout.split()
    # LOSS and ETA are live figures from rank 0's metrics endpoint, which the fake kubelet's pods
    # lack: their cells are empty, so the next word is the acceptance.
    assert row[:5] == [name, "True", "Complete", "5000", "2.75"]


def test_failed_workload_fails_the_resource_with_its_error(
    control_plane: ControlPlane, operator: OperatorProcess, kubelet: FakeKubelet, ns: str
) -> None:
    plane, kube = control_plane, control_plane.kube()
    apply(plane, ns, small_datagen("qwen3-8b-sharegpt", shards=1))
    gen_job = DataGenNames("qwen3-8b-sharegpt", ns).job
    until(lambda: kube.get("batch/v1", "Job", ns, gen_job), what="the generator Job")
    kubelet.drive(
        ns,
        {"job-name": gen_job},
        lambda: is_true(plane, "SpeculatorDataGen", ns, "qwen3-8b-sharegpt", "Complete"),
        shard_report,
    )

    cr = example("hass-train.yaml", "SpeculatorTraining")
    cr["spec"]["trainer"] = {"maxRestarts": 0}
    apply(plane, ns, cr)
    names = TrainingNames(cr["metadata"]["name"], ns)
    until(lambda: kube.get("batch/v1", "Job", ns, names.job), what="the trainer Job")
    error = (
        "Traceback (most recent call last):\nValueError: error: draft vocabulary larger than the verifier's"
    )
    # One rank fails: the Job controller fails the trainer Job (backoffLimit 0) and deletes the
    # others; with no group restart allowed, the training fails naming the rank and its error.
    pod = until(lambda: kubelet.pods(ns, {"job-name": names.job}), what="trainer pods")[0]
    kubelet.index(pod, 0)
    kubelet.finish(pod, exit_code=1, message=error)
    plane.kubectl(
        "wait", "-n", ns, "--for=condition=Failed", "--timeout=30s", f"speculatortraining/{names.name}"
    )
    status = status_of(plane, "SpeculatorTraining", ns, names.name)
    failed = condition(status, "Failed")
    assert failed["reason"] == "RestartsExhausted" and "0 of 0 restarts" in failed["message"]
    assert "(rank 0) exit code 1" in failed["message"]
    assert "draft vocabulary larger than the verifier's" in failed["message"]
    assert (
        condition(status, "Stalled")["status"] == "True" and condition(status, "Ready")["status"] == "False"
    )
    events = json.loads(plane.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    assert any(e["type"] == "Warning" and e["involvedObject"]["name"] == names.name for e in events)


def test_deleting_a_resource_garbage_collects_its_children(
    control_plane: ControlPlane, operator: OperatorProcess, ns: str
) -> None:
    """With the operator (its finalizer deletes children) and without (ownerReferences alone)."""
    plane, kube = control_plane, control_plane.kube()
    plane.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "datagen-online.yaml"))
    name = "llama32-1b-online"
    expected = {
        ("ConfigMap", f"{name}-gen"),
        ("StatefulSet", f"{name}-broker"),
        ("Service", f"{name}-broker"),
        ("Job", f"{name}-gen"),
    }
    until(lambda: expected <= set(children(kube, ns, name, DATAGEN)), what=f"children {expected}")
    until(lambda: pods_of(kube, ns, name, DATAGEN), what="broker and generator pods")
    # Made and read only (never listed or deleted by the operator): the garbage collector takes them.
    collected = [
        ("v1", "Secret", f"{name}-stream-keys"),
        ("networking.k8s.io/v1", "NetworkPolicy", f"{name}-broker"),
    ]
    assert all(kube.get(api_version, kind, ns, child) for api_version, kind, child in collected)
    plane.kubectl("delete", "-n", ns, f"speculatordatagen/{name}", "--timeout=30s")
    until(lambda: not children(kube, ns, name, DATAGEN), what="children deleted")
    until(lambda: not pods_of(kube, ns, name, DATAGEN), what="their pods deleted")
    until(
        lambda: not any(kube.get(api_version, kind, ns, child) for api_version, kind, child in collected),
        what="key Secret and NetworkPolicy collected",
    )

    operator.stop()
    datagen = small_datagen("orphan-check")
    apply(plane, ns, datagen)
    with_operator = OperatorProcess(plane.kubeconfig, operator.log).start()
    until(lambda: ("Job", "orphan-check-gen") in children(kube, ns, "orphan-check", DATAGEN), what="children")
    with_operator.stop()
    # The operator is down: remove its finalizer and delete; the garbage collector does the rest.
    kube.patch(API_VERSION, "SpeculatorDataGen", ns, "orphan-check", {"metadata": {"finalizers": None}})
    plane.kubectl("delete", "-n", ns, "speculatordatagen/orphan-check", "--timeout=30s")
    retained = {("PersistentVolumeClaim", "orphan-check-data")}
    until(
        lambda: set(children(kube, ns, "orphan-check", DATAGEN)) == retained, what="owned children collected"
    )


def test_operator_killed_mid_reconcile_creates_no_duplicates(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    plane, kube = control_plane, control_plane.kube()
    log = tmp_path / "operator.log"
    first = OperatorProcess(plane.kubeconfig, log).start()
    cr = example("eagle3-train.yaml", "SpeculatorTraining")
    name = cr["metadata"]["name"]
    apply(plane, ns, cr)
    until(lambda: children(kube, ns, name, TRAINING), interval=0.02, what="the first child")
    first.stop(signal.SIGKILL)
    before = children(kube, ns, name, TRAINING)

    second = OperatorProcess(plane.kubeconfig, log).start()
    try:
        datagen = TrainingNames(name, ns).datagen
        until(
            lambda: ("Job", f"{datagen}-gen") in children(kube, ns, datagen, DATAGEN),
            what="the generator Job",
        )
        until(
            lambda: ("PersistentVolumeClaim", f"{name}-output") in children(kube, ns, name, TRAINING),
            what="output PVC",
        )
        after = children(kube, ns, name, TRAINING)
        for key, uid in before.items():
            assert after[key] == uid, f"{key} was replaced after the restart"
        trainings = kube.list(API_VERSION, "SpeculatorDataGen", ns, {INSTANCE_LABEL: name})
        assert len(trainings) == 1
        jobs = kube.list("batch/v1", "Job", ns, {INSTANCE_LABEL: datagen})
        assert [j["metadata"]["name"] for j in jobs] == [f"{datagen}-gen"]
        workers = cr["spec"]["dataGen"]["workers"]
        until(lambda: len(kube.list("v1", "Pod", ns, {"job-name": f"{datagen}-gen"})) == workers, what="pods")
    finally:
        second.stop()
