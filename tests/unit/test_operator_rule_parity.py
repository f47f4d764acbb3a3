"""Every rule the models check is in the CRDs and the reverse, swept field by field rather than
case by case (the hand-written bad-CR table is tests/unit/test_operator_examples.py).

Two sweeps: the constraints of the models' JSON schema and of the generated CRD must be the same
at every spec field (crdgen used to drop the bounds of tuple items, so `optim.betas` was [0, 1) in
pydantic only); and for every bound the CRD states, plus int64 for every integer (the API
server's integers), a CR one step outside it must be refused by both the API server emulation
and the models, the models naming the field as `spec.<camelCase path>` (the models' JSON schema
can differ from what they validate: a memory limit of 10**30 passed the models, not the server).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from _operator_support import ROOT, crd_schema, server_errors

from specops.config import ConfigError
from specops_operator.api import SpeculatorDataGen, SpeculatorTraining, parse_resource

Node = dict[str, Any]
KINDS = {"SpeculatorDataGen": SpeculatorDataGen, "SpeculatorTraining": SpeculatorTraining}
BOUNDS = ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties", "pattern")
INT64 = 2**63


def _model_node(node: Node, defs: Node) -> Node:
    """A pydantic JSON-schema node with its $ref inlined and `X | None` reduced to X."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        elif "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            branches = [b for b in node["anyOf"] if b != {"type": "null"}]
            if len(branches) != 1:
                return node
            node = {**{k: v for k, v in node.items() if k != "anyOf"}, **branches[0]}
        else:
            return node


def _model_bounds(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = (value, True)
        elif key in ("minimum", "maximum"):
            out[key] = (value, False)
        elif key in BOUNDS or key == "enum":
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
    return out


def _crd_bounds(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("minimum", "maximum"):
            out[key] = (value, node.get(f"exclusive{key.capitalize()}") is True)
        elif key in BOUNDS or key == "enum":
            out[key] = value
    return out


def _differences(model: Node, crd: Node, defs: Node, path: str) -> Iterator[str]:
    model = _model_node(model, defs)
    mine, theirs = _model_bounds(model), _crd_bounds(crd)
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            yield f"{path}: {key} is {mine.get(key)!r} in the models, {theirs.get(key)!r} in the CRD"
    crd_props = crd.get("properties") or {}
    for name, sub in (model.get("properties") or {}).items():
        if name not in crd_props:
            yield f"{path}.{name}: in the models, not in the CRD"
        else:
            yield from _differences(sub, crd_props[name], defs, f"{path}.{name}")
    for name in set(crd_props) - set(model.get("properties") or {}):
        yield f"{path}.{name}: in the CRD, not in the models"
    if isinstance(model.get("items"), dict):
        yield from _differences(model["items"], crd.get("items") or {}, defs, f"{path}[]")
    for i, item in enumerate(model.get("prefixItems") or []):
        yield from _differences(item, crd.get("items") or {}, defs, f"{path}[{i}]")
    if isinstance(model.get("additionalProperties"), dict):
        yield from _differences(
            model["additionalProperties"], crd.get("additionalProperties") or {}, defs, f"{path}.*"
        )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_field_has_the_same_bounds_in_the_models_and_the_crd(kind: str) -> None:
    schema = KINDS[kind].model_json_schema(by_alias=True)
    spec = schema["properties"]["spec"]
    assert (
        list(_differences(spec, crd_schema(kind)["properties"]["spec"], schema.get("$defs", {}), "spec"))
        == []
    )


# -- one step outside every bound: both refuse ------------------------------------------------------


def _leaves(node: Node, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Node]]:
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _leaves(sub, (*path, name))
    if isinstance(node.get("items"), dict):
        yield from _leaves(node["items"], (*path, 0))
    if isinstance(node.get("additionalProperties"), dict):
        yield from _leaves(node["additionalProperties"], (*path, "x"))


def _outside(node: Node) -> Iterator[tuple[str, Any]]:
    """(bound, a value just outside it) for a scalar node of the CRD."""
    integer = node.get("type") == "integer" or node.get("x-kubernetes-int-or-string")
    number = integer or node.get("type") == "number"
    if number and "minimum" in node:
        low = node["minimum"]
        yield "minimum", low if node.get("exclusiveMinimum") else low - 1
    if number and "maximum" in node:
        high = node["maximum"]
        yield "maximum", high if node.get("exclusiveMaximum") else high + 1
    if integer and node.get("maximum", INT64) >= INT64 - 1:
        yield "int64", INT64
    if node.get("type") == "string" and "enum" not in node:
        if "maxLength" in node:
            yield "maxLength", "a" * (node["maxLength"] + 1)
        if node.get("minLength"):
            yield "minLength", ""


SAMPLE_STRINGS = ("a", "a-b", "/a", "A", "1", "a=b", "a/b", "s3://bkt/a", "http://h")


def _sample(node: Node) -> Any:
    """A value the node accepts, to fill the required siblings of a field under test."""
    if "default" in node:
        return copy.deepcopy(node["default"])
    if "enum" in node:
        return node["enum"][0]
    kind = node.get("type")
    if kind == "object":
        return {name: _sample(node["properties"][name]) for name in node.get("required") or []}
    if kind == "array":
        return [_sample(node["items"]) for _ in range(node.get("minItems", 0))]
    if kind == "string":
        return next(s for s in SAMPLE_STRINGS if re.search(node.get("pattern", ""), s))
    if kind == "boolean":
        return False
    low = node.get("minimum", 1)
    return low + 1 if node.get("exclusiveMinimum") else low


def _placed(doc: Node, schema: Node, path: tuple[str | int, ...], value: Any) -> Node:
    """`doc` with `value` at `path`; missing containers are created with their required fields."""
    out = copy.deepcopy(doc)
    node, where = schema, out
    for i, key in enumerate(path):
        if isinstance(key, int):
            child = node["items"]
            if not where:
                where.append(_sample(child))
        else:
            child = (node.get("properties") or {}).get(key) or node["additionalProperties"]
            if key not in where:
                where[key] = _sample(child) if child.get("type") != "array" else []
        if i == len(path) - 1:
            where[key] = value
        node, where = child, where[key]
    return out


def _examples() -> list[Node]:
    files = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples" / "local").glob("*.yaml"))
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def _spelled(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _cases() -> Iterator[tuple[str, tuple[str | int, ...], str, Node]]:
    for kind in sorted(KINDS):
        schema = crd_schema(kind)
        docs = [d for d in _examples() if d["kind"] == kind]
        for path, node in _leaves(schema["properties"]["spec"], ("spec",)):
            for bound, value in _outside(node):
                yield kind, path, bound, _placed(docs[0], schema, path, value)


CASES = list(_cases())


def test_the_sweep_reaches_every_bounded_field() -> None:
    """The sweep is not vacuous: it covers the fields the hand-written table names, and many more."""
    fields = {(kind, _spelled(path)) for kind, path, _, _ in CASES}
    assert len(fields) > 150
    for wanted in (
        "spec.optim.betas[0]",
        "spec.engine.seed",
        "spec.pod.resources.limits.x",
        "spec.pod.shmSize",
    ):
        assert any(path in (wanted, wanted.replace("spec.", "spec.dataGen.", 1)) for _, path in fields), (
            wanted
        )


@pytest.mark.parametrize(
    ("kind", "path", "bound", "doc"), CASES, ids=[f"{_spelled(c[1])}-{c[2]}" for c in CASES]
)
def test_a_value_outside_a_bound_is_refused_by_both_naming_the_field(
    kind: str, path: tuple[str | int, ...], bound: str, doc: Node
) -> None:
    server = ".".join(map(str, path)) + ":"  # the emulation's spelling of the field
    errors = server_errors(doc)
    assert any(e.startswith(server) for e in errors), f"the API server takes it outside its {bound}: {errors}"
    with pytest.raises(ConfigError) as refused:
        parse_resource(doc)
    assert f"{_spelled(path)}:" in str(refused.value), str(refused.value)
