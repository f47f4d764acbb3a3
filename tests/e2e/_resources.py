"""Our custom resources in e2e tests: examples, apply, status and condition reads, children."""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml
from _controlplane import ROOT, ControlPlane

from specops_operator import API_VERSION
from specops_operator.builders.common import INSTANCE_LABEL, KIND_LABEL
from specops_operator.handlers import CHILD_KINDS
from specops_operator.kube import Kube

Obj = dict[str, Any]


def example(name: str, kind: str) -> Obj:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind))


def apply(plane: ControlPlane, ns: str, manifest: Obj) -> None:
    plane.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(manifest))


def status_of(plane: ControlPlane, kind: str, ns: str, name: str) -> Obj:
    return (plane.kube().get(API_VERSION, kind, ns, name) or {}).get("status") or {}


def condition(status: Obj, type_: str) -> Obj:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def is_true(plane: ControlPlane, kind: str, ns: str, name: str, type_: str) -> bool:
    return condition(status_of(plane, kind, ns, name), type_).get("status") == "True"


def small_datagen(name: str, shards: int = 2, workers: int = 1) -> Obj:
    cr = example("datagen-offline.yaml", "SpeculatorDataGen")
    cr["metadata"]["name"] = name
    cr["spec"].update(shards=shards, workers=workers)
    return cr


def shard_report(index: int) -> Obj:
    return {"written": 10 + index, "skipped": 0, "tokens": 1000, "seconds": 2.0}


def children(kube: Kube, ns: str, instance: str, owner_kind: str) -> dict[tuple[str, str], str]:
    """(kind, name) -> uid of every object labelled as a child of the `owner_kind` named `instance`.

    Both labels: a SpeculatorDataGen and a SpeculatorTraining may share a name
    (examples/datagen-online.yaml does), and their children the instance label.
    """
    labels = {INSTANCE_LABEL: instance, KIND_LABEL: owner_kind}
    out = {}
    for api_version, kind in CHILD_KINDS:
        for obj in kube.list(api_version, kind, ns, labels):
            out[(kind, obj["metadata"]["name"])] = obj["metadata"]["uid"]
    return out


def pods_of(kube: Kube, ns: str, instance: str, owner_kind: str) -> list[Obj]:
    return kube.list("v1", "Pod", ns, {INSTANCE_LABEL: instance, KIND_LABEL: owner_kind})
