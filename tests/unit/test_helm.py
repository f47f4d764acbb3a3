"""The Helm chart, rendered by the real `helm` for the value combinations that matter.

Checks what a reviewer of the chart would: lint, strict schema validation against Kubernetes
1.29-1.34, RBAC verbs enumerated and matching what the operator creates, the Deployment's
hardening, namespaced vs cluster-wide modes, Kueue and ServiceMonitor switches, CRD drift.
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specops"
KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33", "1.34"]
Obj = dict[str, Any]

CASES: dict[str, Obj] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["ml", "research"]},
    "kueue": {"watchNamespaces": ["ml"], "kueue": {"enabled": True, "localQueue": {"clusterQueue": "a100"}}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "scheduling": {
        "imagePullSecrets": ["regcred"],
        "workload": {"image": "registry.example/specops/workload:1.2", "imagePullSecrets": ["wlcred"]},
        "nodeSelector": {"node-role/ops": "true"},
        "tolerations": [{"key": "ops", "operator": "Exists", "effect": "NoSchedule"}],
        "image": {"repository": "registry.example/specops/operator", "tag": "1.2"},
    },
    "no-metrics": {"metrics": {"enabled": False}, "workload": {"serviceAccount": {"create": False}}},
    "workload-monitoring": {
        "watchNamespaces": ["ml"],
        "metrics": {"podMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    },
    "trust": {
        "allowList": {
            "images": ["registry.example/ml/", "ghcr.io/specops/workload"],
            "serviceAccountNames": ["trainer"],
        },
        "streams": {
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]
        },
    },
    "allow-all": {"allowList": {"images": [], "serviceAccountNames": []}},
}


@cache
def helm() -> str:
    found = subprocess.run([ROOT / "hack" / "tools.sh", "--cached"], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip("helm is not installed: run hack/tools.sh (`make setup` does)")
    return str(Path(found.stdout.strip()) / "helm")


def run_helm(*args: str, values: Obj | None = None) -> subprocess.CompletedProcess[str]:
    command = [helm(), *args]
    if values is not None:
        command += ["--values", "-"]
    return subprocess.run(command, input=yaml.safe_dump(values or {}), capture_output=True, text=True)


@cache
def _render(case: str) -> tuple[Obj, ...]:
    result = run_helm("template", "rel", str(CHART), "--namespace", "ops", values=CASES[case])
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(case: str) -> list[Obj]:
    return list(_render(case))


def by_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Obj], kind: str) -> Obj:
    (found,) = by_kind(docs, kind)
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_strict(case: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), values=CASES[case])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kubernetes_accepts_every_object(case: str, version: str) -> None:
    checked = 0
    for doc in render(case):
        if doc["apiVersion"].split("/")[0] in ("kueue.x-k8s.io", "monitoring.coreos.com"):
            continue  # third-party kinds: kubernetes-validate has no schema for them
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 4  # at least ServiceAccount, (Cluster)Role, binding, Deployment


def test_crds_match_the_generated_ones() -> None:
    """helm installs crds/ verbatim: they must be the files `specops crds` generates."""
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    packaged = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert packaged == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"helm/specops/crds/{name} drifted: cp crds/*.yaml helm/specops/crds/"
        )


def test_operator_deployment_is_hardened() -> None:
    deployment = one(render("defaults"), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "ghcr.io/specops/operator:0.1.0"  # appVersion by default
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == one(render("defaults"), "ClusterRoleBinding")["subjects"][0]["name"]


def _args(docs: list[Obj]) -> list[str]:
    return list(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])


def test_cluster_wide_by_default() -> None:
    docs = render("defaults")
    assert "--all-namespaces" in _args(docs)
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-specops", "namespace": "ops"}]


def test_watched_namespaces_get_roles_and_nothing_cluster_wide() -> None:
    docs = render("namespaced")
    args = _args(docs)
    assert "--namespace=ml" in args and "--namespace=research" in args
    assert "--all-namespaces" not in args
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in by_kind(docs, "Role")) == ["ml", "research"]
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == "ops"  # the operator's own namespace
    workload_sas = [
        sa for sa in by_kind(docs, "ServiceAccount") if sa["metadata"]["name"] == "specops-workload"
    ]
    assert sorted(sa["metadata"]["namespace"] for sa in workload_sas) == ["ml", "research"]


def _rules(docs: list[Obj]) -> list[Obj]:
    roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
    return [rule for role in roles for rule in role["rules"]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_rbac_verbs_are_enumerated(case: str) -> None:
    rules = _rules(render(case))
    assert rules
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        if "secrets" in rule["resources"]:
            assert rule["resources"] == ["secrets"] and sorted(rule["verbs"]) == ["create", "get"], (
                "Secrets: only a stream's key Secret is created and read back, never listed or changed"
            )


def granted(rules: list[Obj]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_covers_every_child_kind_the_operator_creates() -> None:
    from specops_operator.handlers import CHILD_KINDS
    from specops_operator.kube import PLURALS

    grants = granted(_rules(render("defaults")))
    for api_version, kind in CHILD_KINDS:
        group = api_version.rpartition("/")[0]
        for verb in ("create", "get", "list", "patch", "delete"):
            assert (group, PLURALS[kind], verb) in grants, f"{verb} {kind}"
    for plural in ("speculatordatagens", "speculatortrainings"):
        for verb in ("get", "list", "watch", "patch"):  # each reconcile reads the stored resource
            assert ("specops.dev", plural, verb) in grants
        assert ("specops.dev", f"{plural}/status", "patch") in grants
    # An inline dataGen is created; no training is.
    for verb in ("create", "delete"):
        assert ("specops.dev", "speculatordatagens", verb) in grants
    assert ("specops.dev", "speculatortrainings", "create") not in grants
    for group, plural in (("batch", "jobs"), ("apps", "statefulsets")):
        assert (group, plural, "watch") in grants, "status follows the children through watches"
    assert ("", "pods", "list") in grants and ("", "events", "create") in grants
    assert ("", "events", "list") in grants, "a stuck Job's FailedCreate, a claim's ProvisioningFailed"
    assert not {g for g in grants if g[1] == "pods" and g[2] != "list"}, "pods are only read"
    from specops_operator.handlers import COLLECTED_KINDS

    for api_version, kind in COLLECTED_KINDS:  # made once, read back; the GC deletes them
        group = api_version.rpartition("/")[0]
        assert {v for g, r, v in grants if (g, r) == (group, PLURALS[kind])} == {"create", "get"}, kind


def test_workload_service_account_has_no_rights_and_no_token() -> None:
    docs = render("scheduling")
    (workload,) = [
        sa for sa in by_kind(docs, "ServiceAccount") if sa["metadata"]["name"] == "specops-workload"
    ]
    assert workload["automountServiceAccountToken"] is False
    assert workload["imagePullSecrets"] == [{"name": "wlcred"}]
    bound = [
        s["name"]
        for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
        for s in b["subjects"]
    ]
    assert "specops-workload" not in bound


def test_images_pull_secrets_and_scheduling_values_reach_the_pod() -> None:
    docs = render("scheduling")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/specops/operator:1.2"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"node-role/ops": "true"}
    assert pod["tolerations"] == [{"key": "ops", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "SPECOPS_WORKLOAD_IMAGE", "value": "registry.example/specops/workload:1.2"} in container[
        "env"
    ]


def test_kueue_local_queue_per_watched_namespace() -> None:
    docs = render("kueue")
    (queue,) = by_kind(docs, "LocalQueue")
    assert queue["metadata"] == {**queue["metadata"], "name": "specops", "namespace": "ml"}
    assert queue["spec"] == {"clusterQueue": "a100"}
    assert not by_kind(render("defaults"), "LocalQueue")
    # spec.suspend of a queued resource (de)activates its Kueue Workloads; no Kueue, no such right.
    workloads = {("kueue.x-k8s.io", "workloads", verb) for verb in ("list", "patch")}
    assert workloads <= granted(_rules(docs)) and not workloads & granted(_rules(render("defaults")))


def test_metrics_service_and_service_monitor() -> None:
    docs = render("monitoring")
    service = one(docs, "Service")
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"  # not kopf's /healthz-only port
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8081} and service["spec"]["ports"][0]["port"] == 8081
    assert "--metrics-port=8081" in container["args"]
    assert monitor_path(docs) == "/metrics"
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(
        service["metadata"]["labels"].items()
    )
    assert not by_kind(render("defaults"), "ServiceMonitor")
    bare = render("no-metrics")
    assert not by_kind(bare, "Service") and "--metrics-port=0" in _args(bare)
    assert [sa["metadata"]["name"] for sa in by_kind(bare, "ServiceAccount")] == ["rel-specops"]


def test_pod_monitor_scrapes_the_workload_pods_and_the_dashboards_ship() -> None:
    """The PodMonitor selects what the operator's trainer, generator and broker pods carry, at
    the port each serves on."""
    from specops_operator.api import SpeculatorDataGen
    from specops_operator.builders.common import METRICS_PORT, Defaults, Owner, labels
    from specops_operator.builders.datagen import build_datagen
    from specops_operator.builders.training import TRAINER

    docs = render("workload-monitoring")
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    doc = next(yaml.safe_load_all((ROOT / "examples" / "datagen-online.yaml").read_text()))
    doc["metadata"].update(namespace="ml", uid="uid-1")
    datagen = SpeculatorDataGen.model_validate(doc)
    templates = {
        child["metadata"]["labels"]["app.kubernetes.io/component"]: child["spec"]["template"]
        for child in build_datagen(datagen, Defaults())
        if child["kind"] in ("Job", "StatefulSet")
    }
    for name in ("generator", "broker"):  # trainer pods: tests/operator/test_live_progress.py
        assert _selects(monitor, templates[name]["metadata"]["labels"]), name
        assert any(p["name"] == "metrics" for p in templates[name]["spec"]["containers"][0]["ports"]), name
    owner = Owner("specops.dev/v1alpha1", "SpeculatorTraining", "run", "ml", "uid-1", {})
    assert _selects(monitor, labels(owner, TRAINER))
    assert not _selects(monitor, labels(owner, "evaluator"))
    assert METRICS_PORT == 9400
    dashboards = one(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for name in ("specops-training.json", "specops-datagen.json"):
        shipped = json.loads(dashboards["data"][name])
        assert shipped == json.loads((CHART / "dashboards" / name).read_text())
    assert not by_kind(render("defaults"), "PodMonitor") and not by_kind(render("defaults"), "ConfigMap")
    assert one(render("monitoring"), "ServiceMonitor") and not by_kind(render("monitoring"), "PodMonitor")


def _selects(monitor: Obj, labels: dict[str, str]) -> bool:
    """Whether a PodMonitor's label selector (matchLabels, matchExpressions `In`) selects these pod labels."""
    selector = monitor["spec"]["selector"]
    if not set(selector.get("matchLabels", {}).items()) <= set(labels.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def monitor_path(docs: list[Obj]) -> str:
    return str(one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["path"])


def test_the_metrics_port_serves_what_the_service_monitor_scrapes(unused_tcp_port: int) -> None:
    """The operator's `--metrics-port` (as the chart passes it) answers the ServiceMonitor's path."""
    import urllib.request

    from specops_operator.__main__ import build_parser
    from specops_operator.metrics import OperatorMetrics

    args = build_parser().parse_args(["run", f"--metrics-port={unused_tcp_port}"])
    metrics = OperatorMetrics()
    metrics.serve(args.metrics_port, "127.0.0.1")
    with metrics.reconciling("SpeculatorDataGen"):
        pass
    url = f"http://127.0.0.1:{unused_tcp_port}{monitor_path(render('monitoring'))}"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert 'specops_reconciles_total{kind="SpeculatorDataGen"} 1.0' in text


def test_finalizer_update_for_owner_reference_permission_enforcement() -> None:
    """Children set blockOwnerDeletion; that admission plugin then wants `update` on the owner's finalizers."""
    for case in ("defaults", "namespaced"):
        grants = granted(_rules(render(case)))
        for plural in ("speculatordatagens", "speculatortrainings"):
            assert ("specops.dev", f"{plural}/finalizers", "update") in grants, case


FEATURES = {
    "Job completionMode Indexed, suspend (GA)": "1.24",
    "CRD x-kubernetes-validations (CEL, beta on by default)": "1.25",
    "Job podFailurePolicy, DisruptionTarget (beta on by default)": "1.26",
    "Job backoffLimitPerIndex (beta on by default)": "1.29",
}
"""What the operator's children and CRDs rely on, and the first release that has it on by default."""


def test_kube_version_is_the_real_minimum() -> None:
    minimum = max(FEATURES.values(), key=lambda v: tuple(map(int, v.split("."))))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={minimum}.0-0"
    major, minor = map(int, minimum.split("."))
    older = run_helm("template", "rel", str(CHART), "--kube-version", f"{major}.{minor - 1}.0")
    assert older.returncode != 0 and "kubeVersion" in older.stderr, older.stderr
    assert run_helm("template", "rel", str(CHART), "--kube-version", f"{minimum}.0").returncode == 0


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"operator": {"refreshSeconds": 0}}, "refreshSeconds"),
        ({"replicas": 2}, "replicas"),
        ({"allowList": {"images": [""]}}, "images"),
        ({"allowList": {"serviceAccountNames": ["Not_An_Account"]}}, "serviceAccountNames"),
        ({"allowList": {"registries": ["x/"]}}, "registries"),
        ({"streams": {"metricsFrom": [{"from": "anywhere"}]}}, "metricsFrom"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(values: Obj, field: str) -> None:
    result = run_helm("template", "rel", str(CHART), values=values)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_docs_stop_the_installed_operator_before_a_local_one() -> None:
    """Two standalone operators on one cluster fight over children: the README's release is scaled
    to 0 first, by the name the chart gives its Deployment."""
    install = "helm install specops helm/specops -n specops-system --create-namespace"
    assert install in (ROOT / "README.md").read_text()
    result = run_helm("template", "specops", str(CHART), "--namespace", "specops-system")
    assert result.returncode == 0, result.stderr
    deployment = one([d for d in yaml.safe_load_all(result.stdout) if d], "Deployment")
    stop = f"kubectl -n specops-system scale deployment/{deployment['metadata']['name']} --replicas=0"
    assert stop in (ROOT / "docs" / "operator.md").read_text()


def _operator_env(case: str) -> dict[str, str]:
    (container,) = one(render(case), "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


@pytest.mark.parametrize(
    ("case", "images", "accounts", "peers"),
    [
        ("defaults", ("ghcr.io/specops/",), ("specops-workload",), ()),
        (
            "trust",
            ("registry.example/ml/", "ghcr.io/specops/workload"),
            ("trainer",),
            ({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},),
        ),
        ("allow-all", (), (), ()),
    ],
)
def test_the_allow_list_reaches_the_operator_as_it_parses_it(
    case: str, images: tuple[str, ...], accounts: tuple[str, ...], peers: tuple[Obj, ...]
) -> None:
    """Secure by default: the chart admits only its own workload images and ServiceAccount; an
    empty list (an explicit choice) admits any."""
    from specops_operator.trust import AllowList, parse_peers

    env = _operator_env(case)
    allow = AllowList.parse(env["SPECOPS_ALLOWED_IMAGES"], env["SPECOPS_ALLOWED_SERVICE_ACCOUNTS"])
    assert (allow.images, allow.service_accounts) == (images, accounts)
    assert parse_peers(env["SPECOPS_STREAM_METRICS_FROM"], "metricsFrom") == peers
