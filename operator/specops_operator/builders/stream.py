"""What makes an operator-managed stream private: its CURVE key Secret, which keys each role's pod
mounts, and the NetworkPolicy in front of the broker. Pure: the keys themselves come from
`specops_operator.stream_keys` (random, so not a builder), and are passed in.

Key files are ZeroMQ certificates named as `specops broker --write-keys` names them, so the
workload loads them unchanged (`specops.stores.wire.broker_keys` / `client_keys`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from specops_operator import PREFIX
from specops_operator.api import STREAM_KEYS_DIR, STREAM_KEYS_VOLUME, SpeculatorDataGenSpec
from specops_operator.builders import common
from specops_operator.builders.common import Manifest, Owner

Role = Literal["broker", "producer", "consumer"]

STREAM_LABEL = f"{PREFIX}/stream"
"""On generator and trainer pods: the SpeculatorDataGen whose stream they produce into or read."""
STREAM_ROLE_LABEL = f"{PREFIX}/stream-role"
"""On the same pods: producer or consumer (what the NetworkPolicy admits to the broker port)."""

KEY_FILES: dict[Role, tuple[str, ...]] = {
    # The broker authorizes every `*.key` in its directory: the two client roles, not its own.
    "broker": ("broker.key_secret", "producer.key", "consumer.key"),
    # A client's own pair, the broker's public key, and the other role's public key (direct path).
    "producer": ("producer.key_secret", "broker.key", "consumer.key"),
    "consumer": ("consumer.key_secret", "broker.key", "producer.key"),
}
"""Which Secret keys each role's pod sees: no pod gets another role's secret key."""
SECRET_KEYS = tuple(sorted({name for files in KEY_FILES.values() for name in files}))
"""Every key of the Secret: three key pairs (public `.key`, secret `.key_secret`)."""


def secret_name(datagen: str) -> str:
    """The CURVE key Secret of the stream of SpeculatorDataGen `datagen`."""
    return f"{datagen}-stream-keys"


def policy_name(datagen: str) -> str:
    """The broker's NetworkPolicy (named like its StatefulSet and Service)."""
    return f"{datagen}-broker"


def curve_on(spec: SpeculatorDataGenSpec) -> bool:
    """Whether the stream of this spec uses CURVE (online streams, unless `broker.curve: false`)."""
    return spec.mode == "online" and spec.broker.curve


def key_secret(owner: Owner, files: Mapping[str, str] | None = None) -> Manifest:
    """The stream's key Secret, owned by the SpeculatorDataGen (garbage-collected with it).
    Without `files`: its identity only, to check the ownership of an existing one."""
    secret: Manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": common.metadata(owner, secret_name(owner.name), "stream"),
        "type": "Opaque",
    }
    if files is not None:
        missing = set(SECRET_KEYS) - set(files)
        if missing:
            raise ValueError(f"stream key files missing: {sorted(missing)}")
        secret["data"] = {
            name: base64.b64encode(files[name].encode()).decode("ascii") for name in SECRET_KEYS
        }
    return secret


@dataclass(frozen=True)
class StreamAccess:
    """What a pod of one role adds to reach the stream: labels, its keys' volume and mount, and
    the config / argument parts that point the workload at them."""

    labels: dict[str, str] = field(default_factory=dict)
    volumes: list[Manifest] = field(default_factory=list)
    mounts: list[Manifest] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    """Config fields of the client (`sync` / `data`): `curve_key_dir`."""
    roots: list[str] = field(default_factory=list)
    """Allowed roots the key directory needs."""
    args: list[str] = field(default_factory=list)
    """Broker arguments."""


def access(datagen: str, spec: SpeculatorDataGenSpec, role: Role) -> StreamAccess:
    """`role`'s part of the stream of SpeculatorDataGen `datagen` (nothing for offline data)."""
    if spec.mode != "online":
        return StreamAccess()
    labels = {} if role == "broker" else {STREAM_LABEL: datagen, STREAM_ROLE_LABEL: role}
    if not spec.broker.curve:
        return StreamAccess(labels=labels)
    volume = {
        "name": STREAM_KEYS_VOLUME,
        "secret": {
            "secretName": secret_name(datagen),
            # Readable by the pod's fsGroup only (the pods run as a non-root uid in that group).
            "defaultMode": 0o440,
            "items": [{"key": name, "path": name} for name in KEY_FILES[role]],
        },
    }
    mount = {"name": STREAM_KEYS_VOLUME, "mountPath": STREAM_KEYS_DIR, "readOnly": True}
    args = ["--curve-key-dir", STREAM_KEYS_DIR, "--allowed-root", STREAM_KEYS_DIR] if role == "broker" else []
    settings = {} if role == "broker" else {"curve_key_dir": STREAM_KEYS_DIR}
    return StreamAccess(labels, [volume], [mount], settings, [STREAM_KEYS_DIR], args)


def network_policy(
    owner: Owner, spec: SpeculatorDataGenSpec, selector: dict[str, str], metrics_from: Sequence[Manifest]
) -> Manifest:
    """Ingress to the broker pod: its port only from the stream's producers and consumers in this
    namespace; the metrics port only from `metrics_from` (the operator's setting; none = closed).
    An empty `from` would admit everyone, so a rule without peers is left out, never rendered."""
    clients = {
        "podSelector": {
            "matchLabels": {STREAM_LABEL: owner.name},
            "matchExpressions": [
                {"key": STREAM_ROLE_LABEL, "operator": "In", "values": ["consumer", "producer"]}
            ],
        }
    }
    ingress: list[Manifest] = [{"from": [clients], "ports": [{"protocol": "TCP", "port": spec.broker.port}]}]
    if metrics_from:
        ingress.append(
            {
                "from": [dict(p) for p in metrics_from],
                "ports": [{"protocol": "TCP", "port": spec.broker.metrics_port}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": common.metadata(owner, policy_name(owner.name), "broker"),
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
