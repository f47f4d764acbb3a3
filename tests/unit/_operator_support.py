"""What a Kubernetes API server does with a CR before storing it, for tests: defaulting,
openAPIV3Schema validation (jsonschema), unknown-field detection (kubectl --validate=strict) and
the CEL `x-kubernetes-validations` (cel-python), read from the committed CRDs."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
FILES = {
    "SpeculatorDataGen": CRDS / "speculatordatagens.specops.dev.yaml",
    "SpeculatorTraining": CRDS / "speculatortrainings.specops.dev.yaml",
}


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load(FILES[kind].read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting, top-down as the API server applies it."""
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        out = dict(obj)
        for name, sub in props.items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out = {k: apply_defaults(extra, v) if k not in props else v for k, v in out.items()}
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


def unknown_fields(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Fields the server would prune (kubectl --validate=strict rejects them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += unknown_fields(props[key], value, f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(extra, value, f"{path}.{key}")
            elif path != ".metadata":
                out.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += unknown_fields(schema["items"], item, f"{path}[{i}]")
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Any:
    """`x-kubernetes-list-type: set`: the API server refuses a duplicate item (as it words it)."""
    if list_type == "set" and isinstance(instance, list):
        for i, item in enumerate(instance):
            if item in instance[:i]:
                yield jsonschema.ValidationError(f"Duplicate value: {json.dumps(item)}")


_Validator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


def schema_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    validator = _Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]


_ENV = celpy.Environment()


@cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


def cel_errors(schema: dict[str, Any], obj: Any, old: Any = None, path: str = "") -> list[str]:
    """Messages of every failing x-kubernetes-validations rule (transition rules only with `old`)."""
    out: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and old is None:
            continue
        activation = {"self": celpy.json_to_cel(obj)}
        if uses_old:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = _program(rule["rule"]).evaluate(activation)
        if isinstance(result, celpy.CELEvalError):
            raise AssertionError(f"{path or '<root>'}: rule {rule['rule']!r} errored: {result}")
        if not bool(result):
            out.append(rule["message"])
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj:
                old_sub = old.get(name) if isinstance(old, dict) else None
                out += cel_errors(sub, obj[name], old_sub, f"{path}.{name}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += cel_errors(schema["items"], item, None, f"{path}[{i}]")
    return out


def server_errors(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Everything an API server (with CEL) and kubectl --validate=strict would reject."""
    schema = crd_schema(obj["kind"])
    defaulted = apply_defaults(schema, obj)
    old_defaulted = apply_defaults(schema, old) if old is not None else None
    return (
        schema_errors(schema, defaulted)
        + [f"unknown field {f}" for f in unknown_fields(schema, obj)]
        + cel_errors(schema, defaulted, old_defaulted)
    )
