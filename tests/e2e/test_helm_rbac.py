"""`helm install` of helm/specops, the operator running under the chart's RBAC, `helm uninstall`.

The operator runs here as a process (no kubelet runs the chart's pod) but with the bearer token
of the chart's ServiceAccount, against an RBAC-authorizing API server. The server's audit log
lists every request it made: none may be forbidden (the chart grants all it needs) and every
granted (resource, verb) must appear (it grants nothing more).
"""

from __future__ import annotations

import base64
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from _controlplane import ROOT, ControlPlane, FakeKubelet, OperatorProcess, until
from _resources import apply, children, example, is_true, shard_report, status_of

from specops_operator import API_VERSION
from specops_operator.builders.common import INSTANCE_LABEL
from specops_operator.builders.datagen import DataGenNames
from specops_operator.builders.training import TrainingNames
from specops_operator.kube import Kube

pytestmark = pytest.mark.e2e
CHART = ROOT / "helm" / "specops"
API_GROUP = "specops.dev"
PLURALS_OF_OURS = ("speculatordatagens", "speculatortrainings")
Obj = dict[str, Any]


def service_account_token(plane: ControlPlane, ns: str, name: str) -> str:
    """The token Secret v1.20's token controller creates for every ServiceAccount."""
    account = until(
        lambda: (plane.get_json("serviceaccount", name, "-n", ns) or {}).get("secrets"), what="SA token"
    )
    secret = json.loads(plane.kubectl("get", "secret", "-n", ns, account[0]["name"], "-o", "json").stdout)
    return base64.b64decode(secret["data"]["token"]).decode()


def granted(plane: ControlPlane, name: str) -> set[tuple[str, str, str]]:
    role = json.loads(plane.kubectl("get", "clusterrole", name, "-o", "json").stdout)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def requests_by(plane: ControlPlane, user: str) -> list[Obj]:
    return [e for e in plane.audit() if e["user"]["username"] == user and "objectRef" in e]


def used(events: list[Obj]) -> set[tuple[str, str, str]]:
    out = set()
    for event in events:
        ref = event["objectRef"]
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        out.add((ref.get("apiGroup", ""), resource, event["verb"]))
    return out


def owner_references(kube: Kube, api_version: str, kind: str, ns: str, name: str) -> list[Obj]:
    return list(
        ((kube.get(api_version, kind, ns, name) or {}).get("metadata") or {}).get("ownerReferences") or []
    )


def exercise(plane: ControlPlane, kubelet: FakeKubelet, ns: str) -> None:
    """Every kind of work the operator does: create, read, patch, adopt, suspend, delete."""
    kube = plane.kube()
    # Online generation: ConfigMap, CURVE key Secret, broker StatefulSet + Service + NetworkPolicy,
    # generator Job; a training on it.
    plane.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "datagen-online.yaml"))
    online = "llama32-1b-online"
    until(lambda: kube.get("apps/v1", "StatefulSet", ns, f"{online}-broker"), what="broker StatefulSet")
    until(lambda: kube.get("v1", "Secret", ns, f"{online}-stream-keys"), what="stream key Secret")
    until(
        lambda: kube.get("networking.k8s.io/v1", "NetworkPolicy", ns, f"{online}-broker"),
        what="NetworkPolicy",
    )
    until(lambda: kube.get("v1", "PersistentVolumeClaim", ns, f"{online}-output"), what="training output PVC")
    # Adoption: children that lost their ownerReference are patched back.
    for api_version, kind, child in (
        ("v1", "ConfigMap", f"{online}-gen"),
        ("v1", "Service", f"{online}-broker"),
    ):
        kube.patch(api_version, kind, ns, child, {"metadata": {"ownerReferences": None}})
        until(partial(owner_references, kube, api_version, kind, ns, child), what=f"{kind} {child} adopted")
    # Suspending patches the StatefulSet (replicas) and the Job.
    kube.patch(API_VERSION, "SpeculatorDataGen", ns, online, {"spec": {"suspend": True}})
    until(lambda: is_true(plane, "SpeculatorDataGen", ns, online, "Suspended"), what="suspended")
    # Offline generation to completion: pods are read for their reports.
    offline = example("datagen-offline.yaml", "SpeculatorDataGen")
    offline["spec"].update(shards=1, workers=1)
    apply(plane, ns, offline)
    job = DataGenNames(offline["metadata"]["name"], ns).job
    until(lambda: kube.get("batch/v1", "Job", ns, job), what="generator Job")
    kubelet.drive(
        ns,
        {"job-name": job},
        lambda: is_true(plane, "SpeculatorDataGen", ns, offline["metadata"]["name"], "Complete"),
        shard_report,
    )
    # A claim the CR owns (storage.retain: false) is adopted back by a patch, and deleted with it.
    scratch = example("datagen-offline.yaml", "SpeculatorDataGen")
    scratch["metadata"]["name"] = "scratch"
    scratch["spec"].update(shards=1, workers=1)
    scratch["spec"]["storage"]["retain"] = False
    apply(plane, ns, scratch)
    claim = partial(owner_references, kube, "v1", "PersistentVolumeClaim", ns, "scratch-data")
    until(claim, what="owned claim scratch-data")
    kube.patch("v1", "PersistentVolumeClaim", ns, "scratch-data", {"metadata": {"ownerReferences": None}})
    until(claim, what="claim scratch-data adopted")
    plane.kubectl("delete", "-n", ns, "speculatordatagen/scratch", "--timeout=30s")
    until(lambda: kube.get("v1", "PersistentVolumeClaim", ns, "scratch-data") is None, what="claim deleted")
    # examples/eagle3-train.yaml as a user applies it: inline generation creates a
    # SpeculatorDataGen, and the training's status says it was seen; deleting it deletes that.
    plane.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "eagle3-train.yaml"))
    inline = example("eagle3-train.yaml", "SpeculatorTraining")
    child = TrainingNames(inline["metadata"]["name"], ns).datagen
    until(
        lambda: status_of(plane, "SpeculatorTraining", ns, inline["metadata"]["name"]).get(
            "observedGeneration"
        ),
        what="eagle3-train reconciled",
    )
    until(lambda: kube.get(API_VERSION, "SpeculatorDataGen", ns, child), what="child SpeculatorDataGen")
    plane.kubectl("delete", "-n", ns, f"speculatortraining/{inline['metadata']['name']}", "--timeout=30s")
    until(lambda: kube.get(API_VERSION, "SpeculatorDataGen", ns, child) is None, what="child deleted")
    plane.kubectl("delete", "-n", ns, f"speculatordatagen/{online}", "--timeout=30s")
    until(
        lambda: (
            not [
                k for k in children(kube, ns, online, "SpeculatorDataGen") if k[0] != "PersistentVolumeClaim"
            ]
        ),
        what="cleanup",
    )


def test_helm_install_least_privilege_and_uninstall(
    control_plane: ControlPlane, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    plane, kube = control_plane, control_plane.kube()
    release_ns = plane.namespace("specops-system")
    # The chart requires the Kubernetes version its Jobs need (tests/unit/test_helm.py checks that
    # gate); this older control plane stands in for RBAC, so the copy installed here drops the gate.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    meta = chart / "Chart.yaml"
    meta.write_text(
        "\n".join(line for line in meta.read_text().splitlines() if not line.startswith("kubeVersion:"))
    )
    # Helm 4 applies CRDs server-side by default, and v1.20's typed CRD schema lacks
    # x-kubernetes-validations (v1.25+): the client-side install is what works on this server.
    installed = plane.helm(
        "install",
        "specops",
        str(chart),
        "--namespace",
        release_ns,
        "--server-side=false",
        "--set",
        "workload.image=specops/workload:e2e",
    )
    assert "STATUS: deployed" in installed.stdout
    assert "kubectl get speculatortrainings -w" in installed.stdout, "NOTES.txt tells what to run next"
    # The operator's own kinds only are in specops_operator.kube: the chart's objects are read by kubectl.
    deployment = until(lambda: plane.get_json("deployment", "specops", "-n", release_ns), what="Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    user = f"system:serviceaccount:{release_ns}:specops"
    kubeconfig = plane.kubeconfig_for("specops-operator", service_account_token(plane, release_ns, "specops"))
    whoami = plane.kubectl("auth", "can-i", "create", "jobs", "--all-namespaces", kubeconfig=kubeconfig)
    assert whoami.stdout.strip() == "yes"
    # Secrets: a stream's key Secret is created and read back by name; no Secret is listed,
    # watched, changed or deleted by the operator.
    for verb in ("list", "watch", "patch", "update", "delete"):
        denied = plane.kubectl(
            "auth", "can-i", verb, "secrets", "-n", release_ns, kubeconfig=kubeconfig, check=False
        )
        assert denied.stdout.strip() == "no", verb

    ns = plane.namespace("ml")
    running = OperatorProcess(kubeconfig, tmp_path / "operator.log").start()
    try:
        exercise(plane, kubelet, ns)
    finally:
        running.stop()

    events = requests_by(plane, user)
    forbidden = sorted({(e["verb"], e["requestURI"]) for e in events if e["responseStatus"]["code"] == 403})
    assert not forbidden, f"the chart's RBAC lacks: {forbidden}"
    # `update` on the owners' finalizers is never a request: the OwnerReferencesPermissionEnforcement
    # admission plugin (on in up.sh) checks it when a child with blockOwnerDeletion is created, so
    # without the grant the children's creates would be in `forbidden` above.
    admission_only = {(API_GROUP, f"{plural}/finalizers", "update") for plural in PLURALS_OF_OURS}
    unused = granted(plane, "specops") - used(events) - admission_only
    assert not unused, f"granted but never used: {sorted(unused)}"

    kept = kube.list(API_VERSION, "SpeculatorDataGen", ns, {})
    plane.helm("uninstall", "specops", "--namespace", release_ns)
    until(
        lambda: plane.get_json("deployment", "specops", "-n", release_ns) is None, what="Deployment removed"
    )
    assert plane.get_json("serviceaccount", "specops", "-n", release_ns) is None
    assert plane.kubectl("get", "clusterrole,clusterrolebinding", "specops", check=False).returncode != 0
    leftovers = plane.kubectl(
        "get",
        "all,serviceaccounts,roles,rolebindings",
        "-n",
        release_ns,
        "-l",
        "app.kubernetes.io/instance=specops",
        "-o",
        "name",
    ).stdout.split()
    assert not leftovers, f"helm uninstall left {leftovers}"
    # Kept on purpose: the CRDs, the user's resources and their data claims.
    assert plane.kubectl("get", "crd", "speculatortrainings.specops.dev").returncode == 0
    assert [d["metadata"]["name"] for d in kube.list(API_VERSION, "SpeculatorDataGen", ns, {})] == [
        d["metadata"]["name"] for d in kept
    ]
    assert kube.list("v1", "PersistentVolumeClaim", ns, {INSTANCE_LABEL: kept[0]["metadata"]["name"]})
