"""Our CRDs on a modern API server (apiextensions-apiserver 0.36, the CRD half of Kubernetes 1.36).

What the v1.20 control plane cannot show: the CEL rules (`x-kubernetes-validations`) compile
within the cost budget and run, transition rules refuse changes, the structural-schema checks of a
current server pass, and strict field validation, defaulting, pruning and the status and scale
subresources behave as a real cluster's. The bad-CR tables are the unit tests' own
(tests/unit/test_operator_examples.py), there checked against an emulation (jsonschema +
cel-python), here against the server.
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from _operator_support import FILES, apply_defaults, crd_schema
from _server import CRD_API, ApiError, Client, CrdServer, condition, crd_manifests
from test_operator_examples import CROSS_FIELD, EXAMPLES, IMMUTABLE, MUTABLE, SCHEMA

from specops.testing.poll import until
from specops_operator.api import immutable_message

pytestmark = pytest.mark.crdserver
Obj = dict[str, Any]
PLURAL = {"SpeculatorDataGen": "speculatordatagens", "SpeculatorTraining": "speculatortrainings"}


def _docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _example(name: str, index: int = 0) -> Obj:
    for path in EXAMPLES:
        if path.name == name:
            return copy.deepcopy(_docs(path)[index])
    raise KeyError(name)


def _path(obj: Obj, ns: str) -> str:
    return Client.path(obj, ns, PLURAL[obj["kind"]])


def _refused(call: Callable[[], Obj]) -> ApiError:
    """The server's refusal: 422 Invalid (schema, CEL), or 400 for a strict-decoding error (an
    unknown field with fieldValidation=Strict)."""
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.code in (400, 422), info.value.status
    return info.value


# -- the CRDs themselves --------------------------------------------------------------------------


def _rules(node: Obj) -> Iterator[Obj]:
    yield from node.get("x-kubernetes-validations") or []
    for sub in (node.get("properties") or {}).values():
        yield from _rules(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _rules(node[key])


@pytest.mark.parametrize("crd", crd_manifests(), ids=lambda c: c["spec"]["names"]["kind"])
def test_crd_is_established_with_every_rule(client: Client, crd: Obj) -> None:
    """Applied server-side with validation on: a non-structural schema, a CEL rule that does not
    compile or one over the cost budget would have refused the apply (422); a schema the server
    accepts but cannot serve shows in the conditions."""
    served = client.crd(crd["metadata"]["name"])
    conditions = {c["type"]: c for c in served["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    assert conditions.get("NonStructuralSchema", {}).get("status") != "True", conditions
    ours = list(_rules(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    kept = list(_rules(served["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    assert len(ours) > 10
    assert sorted((r["rule"], r["message"]) for r in kept) == sorted((r["rule"], r["message"]) for r in ours)


def test_a_rule_over_the_cost_budget_is_refused(client: Client) -> None:
    """The check above means something: this server does compile and cost-check rules."""
    crd = copy.deepcopy(crd_manifests()[0])
    crd["metadata"]["name"] = "costlies.specops.dev"
    crd["spec"]["names"] = {
        "plural": "costlies",
        "singular": "costly",
        "kind": "Costly",
        "listKind": "CostlyList",
    }
    version = crd["spec"]["versions"][0]
    version.pop("subresources", None)
    version.pop("additionalPrinterColumns", None)
    version["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {"xs": {"type": "array", "items": {"type": "string"}}},
                "x-kubernetes-validations": [
                    {
                        "rule": "self.xs.all(a, self.xs.all(b, self.xs.all(c, a + b + c != 'x')))",
                        "message": "m",
                    },
                    {"rule": "self.nope(", "message": "m"},
                ],
            }
        },
    }
    error = _refused(lambda: client.apply(crd, CRD_API))
    assert error.mentions("cost"), error.messages
    assert error.mentions("compilation failed") or error.mentions("Syntax error"), error.messages


# -- good and bad custom resources ----------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(client: Client, ns: str, path: Path) -> None:
    for doc in _docs(path):
        created = client.apply(doc, _path(doc, ns))
        assert created["metadata"]["generation"] == 1
        assert client.warnings == []


@pytest.mark.parametrize(
    ("example", "index", "change", "message"), CROSS_FIELD, ids=[c[3][:40] for c in CROSS_FIELD]
)
def test_cross_field_rules_refuse(
    client: Client, ns: str, example: str, index: int, change: Callable[[Obj], None], message: str
) -> None:
    doc = _example(example, index)
    change(doc)
    error = _refused(lambda: client.create(doc, _path(doc, ns)))
    assert error.mentions(message), error.messages


@pytest.mark.parametrize(
    ("example", "change", "schema_message", "model_message"), SCHEMA, ids=[c[3][:40] for c in SCHEMA]
)
def test_schema_rules_refuse_naming_the_field(
    client: Client,
    ns: str,
    example: str,
    change: Callable[[Obj], None],
    schema_message: str,
    model_message: str,
) -> None:
    """The server words schema errors its own way; it names the same field as the models do.

    Created with POST (as `kubectl create`/client-side apply do): server-side apply of an object with
    an unknown field fails with a 500 ("failed to create typed patch object ... field not declared
    in schema") on this server, a refusal too but not one that names a validation error."""
    doc = _example(example)
    change(doc)
    error = _refused(lambda: client.create(doc, _path(doc, ns)))
    field = model_message.split(":")[0]
    assert error.mentions(field), error.messages


# -- updates: legal ones pass, every immutability (transition) rule refuses its change --------------


def _create(client: Client, ns: str, doc: Obj) -> Obj:
    return client.apply(doc, _path(doc, ns))


@pytest.mark.parametrize(("example", "change", "field"), IMMUTABLE, ids=[c[2] for c in IMMUTABLE])
def test_immutable_fields_refuse(
    client: Client, ns: str, example: str, change: Callable[[Obj], None], field: str
) -> None:
    doc = _example(example)
    _create(client, ns, doc)
    change(doc)
    error = _refused(lambda: client.apply(doc, _path(doc, ns)))
    assert error.mentions(immutable_message(field)), error.messages


@pytest.mark.parametrize(("example", "change"), MUTABLE)
def test_mutable_fields_change(client: Client, ns: str, example: str, change: Callable[[Obj], None]) -> None:
    doc = _example(example)
    _create(client, ns, doc)
    change(doc)
    updated = client.apply(doc, _path(doc, ns))
    assert updated["metadata"]["generation"] == 2


def test_the_export_changes_while_the_rest_of_the_spec_stays_fixed(client: Client, ns: str) -> None:
    """`spec.export` may be added, fixed, switched to an object store and removed (the operator
    uploads again); an update that also changes an immutable field is refused naming that field."""
    doc = _example("hass-train.yaml")
    assert "export" not in doc["spec"]
    _create(client, ns, doc)
    exports = (
        {"hub": {"repo": "acme/draft-typo", "tokenSecret": {"name": "hf", "key": "token"}}},
        {"hub": {"repo": "acme/draft", "tokenSecret": {"name": "hf-write", "key": "token"}}},
        {"uri": "s3://drafts/hass", "credentialsSecret": {"name": "s3"}},
    )
    for generation, export in enumerate(exports, start=2):
        doc["spec"]["export"] = export
        stored = client.apply(doc, _path(doc, ns))
        defaulted = apply_defaults(crd_schema("SpeculatorTraining"), doc)["spec"]["export"]
        assert stored["spec"]["export"] == defaulted and stored["metadata"]["generation"] == generation
    both = copy.deepcopy(doc)
    both["spec"]["export"] = {"hub": {"repo": "acme/other"}}
    both["spec"]["nodes"] = doc["spec"]["nodes"] + 1
    error = _refused(lambda: client.apply(both, _path(both, ns)))
    assert error.mentions(immutable_message("nodes")), error.messages
    assert not error.mentions(immutable_message("export")), error.messages
    del doc["spec"]["export"]
    stored = client.apply(doc, _path(doc, ns))
    assert "export" not in stored["spec"] and stored["metadata"]["generation"] == len(exports) + 2


_TRANSITION = re.compile(r"^(?:has\(self\.(\w+)\)|self\.(\w+) == oldSelf\.\w+$)")


def _transition_rules(kind: str) -> list[tuple[tuple[str, ...], str]]:
    """(path of the object node, field) of every `... == oldSelf...` rule of the kind's schema."""
    out: list[tuple[tuple[str, ...], str]] = []

    def walk(node: Obj, path: tuple[str, ...]) -> None:
        for rule in node.get("x-kubernetes-validations") or []:
            if "oldSelf" in rule["rule"]:
                match = _TRANSITION.match(rule["rule"])
                assert match, f"unrecognised transition rule {rule['rule']!r}"
                field = match.group(1) or match.group(2)
                assert rule["message"] == immutable_message(field)
                out.append((path, field))
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, (*path, name))

    walk(crd_schema(kind), ())
    return out


def _bounded(schema: Obj, value: float) -> bool:
    if "minimum" in schema and value < schema["minimum"]:
        return False
    return not ("maximum" in schema and value > schema["maximum"])


def _changed(schema: Obj, value: Any) -> Any:
    """A different value the schema accepts, or None when this generic walk finds none."""
    if "enum" in schema:
        return next((v for v in schema["enum"] if v != value), None)
    kind = schema.get("type")
    if isinstance(value, bool):
        return not value
    if kind == "integer" or (schema.get("x-kubernetes-int-or-string") and isinstance(value, int)):
        return next((v for v in (value + 1, value - 1) if _bounded(schema, v)), None)
    if kind == "number":
        return next(
            (v for v in (value + 0.5, value / 2, value - 0.5) if v != value and _bounded(schema, v)), None
        )
    if kind == "string" and isinstance(value, str):
        candidates = (value + "x", value + "1", value[:-1])
        return next(
            (
                v
                for v in candidates
                if v
                and len(v) <= schema.get("maxLength", 1 << 30)
                and re.search(schema.get("pattern", ""), v)
            ),
            None,
        )
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name in sorted(value, key=lambda n: (isinstance(value[n], dict | list), n)):
            if name in props:
                new = _changed(props[name], value[name])
                if new is not None:
                    return {**value, name: new}
        return None
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        if not value:  # an empty list changes by gaining one item of the schema's kind
            first = (
                items["enum"][0] if "enum" in items else {"string": "x", "integer": 1}.get(items.get("type"))
            )
            return None if first is None else [first]
        new = _changed(items, value[0])
        return None if new is None else [new, *value[1:]]
    return None


REFUSED_FIELDS = {("SpeculatorTraining", ("spec", "dataGen"), "modelCache")}
"""Fields a cross-field rule refuses outright (`spec.dataGen.modelCache`: the training's own
`spec.modelCache` is shared), so their inherited transition rule can never be reached."""


def _immutability_cases() -> list[tuple[str, tuple[str, ...], str]]:
    return [
        (kind, path, field)
        for kind in FILES
        for path, field in _transition_rules(kind)
        if (kind, path, field) not in REFUSED_FIELDS
    ]


# Legal values for optional fields that no example sets, so their rules get a value to guard.
ADDED: dict[str, Any] = {
    "chatTemplate": "{{ messages }}",
    "regenerate": {},
    "verifierArchitecture": {"numLayers": 2, "hiddenSize": 64, "vocabSize": 1000},
    "verifier": {"nameOrPath": "Qwen/Qwen3-8B"},
    "procsPerNode": 1,
    "runName": "qwen3-hass",
    "modelCache": {"existingClaim": "models"},
}


def _node(doc: Obj, path: tuple[str, ...]) -> Any:
    for key in path:
        doc = (doc or {}).get(key)
    return doc


def _with_field(kind: str, path: tuple[str, ...], field: str) -> tuple[Obj, bool]:
    """An example of `kind` where path.field has a value, and whether the value was ADDED here."""
    docs = [doc for example in EXAMPLES for doc in _docs(example) if doc["kind"] == kind]
    for doc in docs:
        if field in (_node(apply_defaults(crd_schema(kind), doc), path) or {}):
            return doc, False
    for doc in docs:
        node = _node(doc, path)
        if isinstance(node, dict) and field in ADDED:
            node[field] = copy.deepcopy(ADDED[field])
            return doc, True
    pytest.fail(f"no example of {kind} has {'.'.join((*path, field))}: add a value to ADDED")


@pytest.mark.parametrize(
    ("kind", "path", "field"),
    _immutability_cases(),
    ids=[f"{kind}:{'.'.join((*path, field))}" for kind, path, field in _immutability_cases()],
)
def test_every_immutability_rule_refuses_its_transition(
    client: Client, ns: str, kind: str, path: tuple[str, ...], field: str
) -> None:
    """Each transition rule, one at a time: an example that has the field (defaults included, as the
    server stored it) gets only that field changed to another schema-valid value; an optional field
    is also refused when added to an object created without it."""
    schema = crd_schema(kind)
    doc, added = _with_field(kind, path, field)
    stored = apply_defaults(schema, doc)
    node_schema = schema
    for key in path:
        node_schema = node_schema["properties"][key]
    new = _changed(node_schema["properties"][field], _node(stored, path)[field])
    assert new is not None, f"no other legal value for {field}: extend _changed"
    _create(client, ns, doc)
    changed = copy.deepcopy(stored)
    changed["metadata"] = {"name": doc["metadata"]["name"]}
    _node(changed, path)[field] = new
    error = _refused(lambda: client.apply(changed, _path(changed, ns)))
    assert error.mentions(immutable_message(field)), error.messages
    if added:
        without = copy.deepcopy(doc)
        without["metadata"]["name"] += "-add"
        del _node(without, path)[field]
        _create(client, ns, without)
        with_it = copy.deepcopy(doc)
        with_it["metadata"]["name"] = without["metadata"]["name"]
        error = _refused(lambda: client.apply(with_it, _path(with_it, ns)))
        assert error.mentions(immutable_message(field)), error.messages
        # ... and removed from one created with it (apply drops what its manager no longer sets).
        without["metadata"]["name"] = doc["metadata"]["name"]
        error = _refused(lambda: client.apply(without, _path(without, ns)))
        assert error.mentions(immutable_message(field)), error.messages


# -- defaulting, pruning, subresources -------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_server_defaults_match_the_schema_defaults(client: Client, ns: str, path: Path) -> None:
    """What the server stores is the example with the schema's defaults applied: the emulation the
    unit tests use (apply_defaults) defaults exactly as the server does."""
    for doc in _docs(path):
        created = client.create(doc, _path(doc, ns))
        assert created["spec"] == apply_defaults(crd_schema(doc["kind"]), doc)["spec"]


def test_unknown_fields_are_pruned_or_refused(client: Client, ns: str) -> None:
    doc = _example("hass-train.yaml")
    doc["spec"]["notAField"] = 1
    doc["spec"]["draft"]["alsoNot"] = "x"
    error = _refused(lambda: client.create(doc, _path(doc, ns)))
    assert error.mentions('unknown field "spec.notAField"'), error.messages
    assert error.mentions('unknown field "spec.draft.alsoNot"'), error.messages
    created = client.request("POST", _path(doc, ns), doc, params={"fieldValidation": "Ignore"})
    assert created["metadata"]["generation"] == 1
    assert "notAField" not in created["spec"] and "alsoNot" not in created["spec"]["draft"]
    assert created["spec"]["draft"]["algorithm"] == "hass"
    assert created["spec"]["suspend"] is False, "server-side defaulting from the generated schema"


def _status(generation: int) -> Obj:
    ready = {"type": "Ready", "status": "False", "reason": "Training", "message": ""}
    ready |= {"lastTransitionTime": "2026-11-26T10:00:00Z", "observedGeneration": generation}
    return {"observedGeneration": generation, "conditions": [ready], "progress": {"step": 1200}}


def test_status_subresource(client: Client, ns: str) -> None:
    doc = _example("hass-train.yaml")
    path, name = _path(doc, ns), doc["metadata"]["name"]
    _create(client, ns, doc)
    # Status written through the main resource is dropped; spec through /status too.
    ignored = client.merge_patch(path, name, {"status": {"dataGen": "x"}})
    assert "dataGen" not in (ignored.get("status") or {})
    written = client.merge_patch(path, name, {"status": _status(1), "spec": {"suspend": True}}, "status")
    assert written["status"]["progress"]["step"] == 1200
    assert written["spec"]["suspend"] is False and written["metadata"]["generation"] == 1
    assert condition(client.get(path, name), "Ready")["reason"] == "Training"
    # The status schema is enforced too.
    bad = _status(1)
    bad["conditions"][0]["status"] = "Maybe"
    error = _refused(lambda: client.merge_patch(path, name, {"status": bad}, "status"))
    assert error.mentions("status.conditions[0].status"), error.messages


def test_printer_columns_read_conditions_by_type(client: Client, ns: str) -> None:
    """The columns' JSONPath filters, as the server evaluates them for `kubectl get` (Table)."""
    doc = _example("hass-train.yaml")
    path, name = _path(doc, ns), doc["metadata"]["name"]
    _create(client, ns, doc)
    status = _status(1)
    stalled = {**status["conditions"][0], "type": "Stalled", "reason": "Other", "message": "m"}
    status["conditions"].append(stalled)  # the last condition is not the Ready one
    client.merge_patch(path, name, {"status": status}, "status")
    table = client.session.get(
        f"{client.server}{path}",
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        verify=client.ca,
        timeout=30,
    ).json()
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert columns[:8] == ["Name", "Ready", "Reason", "Step", "Loss", "ETA", "Acceptance", "Age"]
    assert (row["Name"], row["Ready"], row["Reason"], row["Step"]) == (name, "False", "Training", 1200)
    assert row["Algorithm"] == "hass"


def test_scale_subresource(client: Client, ns: str) -> None:
    """SpeculatorDataGen scales by spec.workers; the CEL rule workers <= shards guards it too."""
    doc = _example("datagen-offline.yaml")
    path, name = _path(doc, ns), doc["metadata"]["name"]
    created = _create(client, ns, doc)
    shards = created["spec"]["shards"]
    client.merge_patch(path, name, {"status": {"workers": 1, "selector": "app=x"}}, "status")
    scale = client.get(path, name, "scale")
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == created["spec"]["workers"]
    assert scale["status"] == {"replicas": 1, "selector": "app=x"}
    client.merge_patch(path, name, {"spec": {"replicas": shards}}, "scale")
    assert client.get(path, name)["spec"]["workers"] == shards
    error = _refused(lambda: client.merge_patch(path, name, {"spec": {"replicas": shards + 1}}, "scale"))
    assert error.mentions("spec.workers must be <= spec.shards"), error.messages


# -- the harness itself -----------------------------------------------------------------------------


def test_the_watchdog_stops_the_server_when_its_owner_dies(crd_server: CrdServer, tmp_path: Path) -> None:
    """A test run killed with -9 leaves no etcd or apiserver behind (hack/control-plane/watchdog.sh)."""
    owner = subprocess.Popen(["sleep", "600"])
    try:
        server = CrdServer.start(tmp_path / "owned", crd_server.bin_dir, owner=owner.pid)
        processes = [psutil.Process(int(pid)) for pid in (server.state / "pids").read_text().split()]
        assert len(processes) == 2 and all(p.is_running() for p in processes)
    finally:
        owner.kill()
        owner.wait()
    until(lambda: not (server.state / "pids").exists(), timeout=30, what="the watchdog to run down.sh")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
