"""Who may talk to a stream and who may run what: the operator's CURVE key Secret per stream (made
once, owned by the CR, each role mounting only its own keys), the broker's NetworkPolicy, and the
allow-list of images and ServiceAccounts (a CR outside it is Stalled NotAllowed, nothing created)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from conftest import Api, Runner, Running, example
from specops.stores.wire import broker_keys, client_keys
from specops_operator.api import STREAM_KEYS_DIR, STREAM_KEYS_VOLUME
from specops_operator.builders.common import Defaults
from specops_operator.builders.stream import SECRET_KEYS, STREAM_LABEL, STREAM_ROLE_LABEL
from specops_operator.trust import AllowList, image_allowed

DG = ("specops.dev/v1alpha1", "SpeculatorDataGen")
TR = ("specops.dev/v1alpha1", "SpeculatorTraining")
ONLINE = "llama32-1b-online"
KEYS = f"{ONLINE}-stream-keys"
Obj = dict[str, Any]


def _conditions(obj: Obj | None) -> dict[str, Obj]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _posts(api: Api, plural: str) -> int:
    return sum(
        1
        for r in api.server
        if r.method == kmock.method.POST and r.resource is not None and r.resource.plural == plural
    )


def _pod(workload: Obj | None) -> Obj:
    assert workload is not None
    return dict(workload["spec"]["template"])


def _key_items(pod: Obj) -> list[str]:
    """The Secret keys a pod mounts from the stream's key Secret (and where)."""
    spec = pod["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == STREAM_KEYS_VOLUME]
    assert volume["secret"]["secretName"] == KEYS
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == STREAM_KEYS_VOLUME]
    assert mount == {"name": STREAM_KEYS_VOLUME, "mountPath": STREAM_KEYS_DIR, "readOnly": True}
    return [item["key"] for item in volume["secret"]["items"]]


def _materialize(secret: Obj, items: list[str], directory: Path) -> Path:
    """What the kubelet writes for a Secret volume with these items."""
    directory.mkdir()
    for key in items:
        (directory / key).write_bytes(base64.b64decode(secret["data"][key]))
    return directory


async def _online(api: Api, operator: Runner, **changes: Any) -> tuple[Obj, Running]:
    running = await operator()
    datagen = example("datagen-online.yaml")
    datagen["spec"].update(changes)
    cr = await api.create(datagen)
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{ONLINE}-gen"), what="generator Job")
    return cr, running


async def test_a_stream_gets_one_key_secret_owned_by_its_resource_never_rekeyed(
    api: Api, operator: Runner, tmp_path: Path
) -> None:
    cr, first = await _online(api, operator)
    await asyncio.sleep(1.5)  # several refreshes
    secret = api.get("v1", "Secret", "ml", KEYS)
    assert secret is not None
    assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [cr["metadata"]["uid"]]
    assert (
        sorted(secret["data"])
        == sorted(SECRET_KEYS)
        == [
            "broker.key",
            "broker.key_secret",
            "consumer.key",
            "consumer.key_secret",
            "producer.key",
            "producer.key_secret",
        ]
    )
    assert _posts(api, "secrets") == 1
    # The mounted files are what the workload loads, and each client key is bound to its role.
    broker = broker_keys(
        _materialize(
            secret,
            _key_items(_pod(api.get("apps/v1", "StatefulSet", "ml", f"{ONLINE}-broker"))),
            tmp_path / "b",
        )
    )
    producer = client_keys(
        _materialize(
            secret, _key_items(_pod(api.get("batch/v1", "Job", "ml", f"{ONLINE}-gen"))), tmp_path / "p"
        ),
        "producer",
    )
    assert producer.server_public == broker.public
    assert broker.roles[producer.public.decode()] == {"producer"}
    # Three distinct key pairs.
    publics = {base64.b64decode(secret["data"][f"{n}.key"]) for n in ("broker", "producer", "consumer")}
    assert len(publics) == 3
    # A restarted operator keeps the keys the running pods hold.
    await first.stop()
    restarted = await operator()
    await asyncio.sleep(1.0)
    assert restarted.ctx.reconciles > 0
    again = api.get("v1", "Secret", "ml", KEYS)
    assert again is not None and again["data"] == secret["data"]


async def test_each_role_mounts_only_its_own_secret_key(api: Api, operator: Runner) -> None:
    await _online(api, operator)
    training = example("datagen-online.yaml", 1)
    await api.create(training)
    # The broker becomes ready: the training's trainer Job follows.
    await api.patch("apps/v1", "StatefulSet", "ml", f"{ONLINE}-broker", {"status": {"readyReplicas": 1}})
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{ONLINE}-train"), what="trainer Job")
    broker = _pod(api.get("apps/v1", "StatefulSet", "ml", f"{ONLINE}-broker"))
    generator = _pod(api.get("batch/v1", "Job", "ml", f"{ONLINE}-gen"))
    trainer = _pod(api.get("batch/v1", "Job", "ml", f"{ONLINE}-train"))
    assert _key_items(broker) == ["broker.key_secret", "producer.key", "consumer.key"]
    assert _key_items(generator) == ["producer.key_secret", "broker.key", "consumer.key"]
    assert _key_items(trainer) == ["consumer.key_secret", "broker.key", "producer.key"]
    for pod in (broker, generator, trainer):
        assert pod["spec"].get("automountServiceAccountToken") is False
    # The broker requires CURVE; the clients' configs point at their keys, under an allowed root.
    command = broker["spec"]["containers"][0]["command"]
    assert command[command.index("--curve-key-dir") + 1] == STREAM_KEYS_DIR
    gen_config = yaml.safe_load(
        (api.get("v1", "ConfigMap", "ml", f"{ONLINE}-gen") or {})["data"]["config.yaml"]
    )
    assert gen_config["sync"]["curveKeyDir"] == STREAM_KEYS_DIR
    assert STREAM_KEYS_DIR in gen_config["run"]["allowedRoots"]
    train_config = yaml.safe_load(
        (api.get("v1", "ConfigMap", "ml", f"{ONLINE}-train") or {})["data"]["config.yaml"]
    )
    assert train_config["data"]["curveKeyDir"] == STREAM_KEYS_DIR
    assert STREAM_KEYS_DIR in train_config["allowedRoots"]
    # The labels the NetworkPolicy admits.
    assert generator["metadata"]["labels"][STREAM_LABEL] == ONLINE
    assert generator["metadata"]["labels"][STREAM_ROLE_LABEL] == "producer"
    assert trainer["metadata"]["labels"][STREAM_LABEL] == ONLINE
    assert trainer["metadata"]["labels"][STREAM_ROLE_LABEL] == "consumer"


async def test_the_broker_network_policy_admits_only_the_streams_pods(api: Api, operator: Runner) -> None:
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    running = await operator()
    running.ctx.defaults = Defaults(image="specops/workload:test", metrics_from=(prometheus,))
    cr = await api.create(example("datagen-online.yaml"))
    policy = await api.until(
        lambda: api.get("networking.k8s.io/v1", "NetworkPolicy", "ml", f"{ONLINE}-broker"), what="policy"
    )
    assert [r["uid"] for r in policy["metadata"]["ownerReferences"]] == [cr["metadata"]["uid"]]
    broker = _pod(api.get("apps/v1", "StatefulSet", "ml", f"{ONLINE}-broker"))
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selected = spec["podSelector"]["matchLabels"]
    assert selected.items() <= broker["metadata"]["labels"].items()
    clients, metrics = spec["ingress"]
    assert clients["ports"] == [{"protocol": "TCP", "port": 5555}]
    (peer,) = clients["from"]
    assert peer["podSelector"]["matchLabels"] == {STREAM_LABEL: ONLINE}
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": STREAM_ROLE_LABEL, "operator": "In", "values": ["consumer", "producer"]}
    ]
    assert "namespaceSelector" not in peer, "only pods of this namespace"
    assert metrics == {"from": [prometheus], "ports": [{"protocol": "TCP", "port": 9100}]}


async def test_without_metrics_peers_the_metrics_port_is_closed(api: Api, operator: Runner) -> None:
    """An ingress rule without `from` admits everyone: with no peers configured there is none."""
    await _online(api, operator)
    policy = api.get("networking.k8s.io/v1", "NetworkPolicy", "ml", f"{ONLINE}-broker")
    assert policy is not None
    assert [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]] == [5555]
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])


async def test_curve_opt_out_makes_no_secret_and_mounts_no_keys(api: Api, operator: Runner) -> None:
    datagen = example("datagen-online.yaml")
    await _online(api, operator, broker={**datagen["spec"]["broker"], "curve": False})
    await asyncio.sleep(0.6)
    assert api.get("v1", "Secret", "ml", KEYS) is None
    broker = _pod(api.get("apps/v1", "StatefulSet", "ml", f"{ONLINE}-broker"))
    assert "--curve-key-dir" not in broker["spec"]["containers"][0]["command"]
    assert all(v["name"] != STREAM_KEYS_VOLUME for v in broker["spec"]["volumes"])
    gen_config = yaml.safe_load(
        (api.get("v1", "ConfigMap", "ml", f"{ONLINE}-gen") or {})["data"]["config.yaml"]
    )
    assert "curveKeyDir" not in gen_config["sync"]
    assert api.get("networking.k8s.io/v1", "NetworkPolicy", "ml", f"{ONLINE}-broker") is not None


async def test_offline_data_has_no_stream_secret_or_policy(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", "qwen3-8b-sharegpt-gen"), what="generator Job")
    assert api.children("Secret") == [] and api.children("NetworkPolicy") == []


def _forbid_reads(api: Api, plural: str) -> None:
    """Answer every GET of `plural` as an API server whose RBAC lacks that grant does."""

    def get(request: kmock.Request) -> bool:
        return (
            request.method == kmock.method.GET
            and request.resource is not None
            and request.resource.plural == plural
        )

    api.server[get] << 403 << {"kind": "Status", "reason": "Forbidden", "message": f"{plural} is forbidden"}


async def test_rbac_without_secrets_stalls_forbidden_naming_the_secret(api: Api, operator: Runner) -> None:
    """An operator upgraded without the chart's new grant: Stalled with the server's answer, no
    broker or generators (they could not start without their keys), not an endless retry."""

    _forbid_reads(api, "secrets")
    await operator()
    await api.create(example("datagen-online.yaml"))
    stalled = await api.until(lambda: _stalled(api, DG, ONLINE), what="Stalled")
    assert stalled["reason"] == "Forbidden"
    assert stalled["message"].startswith(f"get Secret ml/{KEYS}: 403 Forbidden: secrets is forbidden")
    await asyncio.sleep(0.6)  # refreshes keep it so
    assert api.children("StatefulSet") == [] and api.children("Job") == []


async def test_rbac_without_a_childs_read_stalls_naming_it(api: Api, operator: Runner) -> None:
    """Any child kind, not only Secrets: once the NetworkPolicy exists, refreshes read it first; a
    chart whose RBAC lacks that read is Stalled Forbidden naming the object, not an endless retry."""

    _forbid_reads(api, "networkpolicies")
    await operator(interval=1)
    await api.create(example("datagen-online.yaml"))
    stalled = await api.until(lambda: _stalled(api, DG, ONLINE), what="Stalled")
    assert stalled["reason"] == "Forbidden"
    assert stalled["message"].startswith(
        f"get NetworkPolicy ml/{ONLINE}-broker: 403 Forbidden: networkpolicies is forbidden"
    )


# --------------------------------------------------------------------------- allow-list

ALLOW = AllowList(images=("registry.example/ml/",), service_accounts=("specops-workload",))


def _stalled(api: Api, kind: tuple[str, str], name: str) -> Obj | None:
    stalled = _conditions(api.get(*kind, "ml", name)).get("Stalled") or {}
    return stalled if stalled.get("status") == "True" else None


async def test_an_image_outside_the_allow_list_stalls_before_any_child(api: Api, operator: Runner) -> None:
    running = await operator()
    running.ctx.allow = ALLOW
    datagen = example("datagen-online.yaml")
    datagen["spec"]["pod"]["image"] = "docker.io/attacker/miner:latest"
    await api.create(datagen)
    stalled = await api.until(lambda: _stalled(api, DG, ONLINE), what="Stalled")
    assert stalled["reason"] == "NotAllowed"
    assert stalled["message"] == (
        "spec.pod.image: 'docker.io/attacker/miner:latest' is not allowed "
        "(allowed image prefixes: registry.example/ml/)"
    )
    await asyncio.sleep(0.6)
    for kind in ("Job", "StatefulSet", "ConfigMap", "Service", "Secret", "NetworkPolicy"):
        assert api.children(kind) == [], kind
    assert _posts(api, "jobs") == 0


async def test_a_service_account_outside_the_allow_list_stalls_an_inline_training(
    api: Api, operator: Runner
) -> None:
    running = await operator()
    running.ctx.allow = ALLOW
    training = example("eagle3-train.yaml")
    training["spec"]["dataGen"].setdefault("pod", {})["serviceAccountName"] = "cluster-admin-sa"
    await api.create(training)
    name = training["metadata"]["name"]
    stalled = await api.until(lambda: _stalled(api, TR, name), what="Stalled")
    assert stalled["reason"] == "NotAllowed"
    assert stalled["message"].startswith(
        "spec.dataGen.pod.serviceAccountName: 'cluster-admin-sa' is not allowed"
    )
    assert "specops-workload" in stalled["message"]
    await asyncio.sleep(0.6)
    assert api.children("SpeculatorDataGen") == [] and api.children("Job") == []


async def test_images_and_accounts_inside_the_allow_list_run(api: Api, operator: Runner) -> None:
    running = await operator()
    running.ctx.allow = ALLOW
    datagen = example("datagen-online.yaml")
    datagen["spec"]["pod"].update(
        image="registry.example/ml/workload:1.0", serviceAccountName="specops-workload"
    )
    await api.create(datagen)
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{ONLINE}-gen"), what="generator Job")
    assert _stalled(api, DG, ONLINE) is None


@pytest.mark.parametrize(
    ("image", "prefix", "allowed"),
    [
        ("ghcr.io/acme/workload:1", "ghcr.io/acme/", True),
        ("ghcr.io/acme-evil/workload:1", "ghcr.io/acme/", False),
        ("ghcr.io/acme-evil/workload:1", "ghcr.io/acme", False),
        ("ghcr.io/acme/workload:1", "ghcr.io/acme", True),
        ("ghcr.io/acme/workload@sha256:ab", "ghcr.io/acme/workload", True),
        ("ghcr.io/acme/workload:2", "ghcr.io/acme/workload", True),
        ("ghcr.io/acme/workload2:1", "ghcr.io/acme/workload", False),
        ("ghcr.io/acme/workload:1", "ghcr.io/acme/workload:1", True),
        ("ghcr.io/acme/workload:12", "ghcr.io/acme/workload:1", False),
    ],
)
def test_image_prefixes_match_at_path_boundaries(image: str, prefix: str, allowed: bool) -> None:
    assert image_allowed(image, prefix) is allowed


@pytest.mark.parametrize(
    ("images", "accounts", "peers", "option"),
    [
        ("ghcr.io/acme/", None, None, "--allowed-images"),
        ('[""]', None, None, "--allowed-images"),
        (None, '{"a": 1}', None, "--allowed-service-accounts"),
        (None, None, '[{"from": "anywhere"}]', "--stream-metrics-from"),
        (None, None, "[{}]", "--stream-metrics-from"),
    ],
)
def test_bad_operator_settings_name_the_option(
    images: str | None, accounts: str | None, peers: str | None, option: str
) -> None:
    from specops.config import ConfigError
    from specops_operator.trust import parse_peers

    with pytest.raises(ConfigError, match=f"^{option}: expected a JSON list"):
        AllowList.parse(images, accounts)
        parse_peers(peers, "--stream-metrics-from")
