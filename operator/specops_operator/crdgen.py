"""pydantic models -> CustomResourceDefinition YAML (structural openAPIV3Schema + presentation).

The JSON schema pydantic emits is rewritten into what the API server accepts as a *structural*
schema: `$ref`s inlined, `Optional` unions reduced to the non-null branch, JSON-Schema-2020
keywords mapped to OpenAPI v3.0 ones, every string/list/map bounded (CEL cost estimation needs
bounds), defaults of `default_factory` fields materialized so server-side defaulting agrees with
pydantic. Printer columns, short names, categories and subresources are Kubernetes presentation
and live here. Pure: pydantic and yaml only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from specops_operator import GROUP, VERSION
from specops_operator.api import (
    DATAGEN_KIND,
    TRAINING_KIND,
    SpeculatorDataGen,
    SpeculatorTraining,
)

DEFAULT_MAX_LENGTH = 4096
"""Bound for strings the models leave unbounded."""
DEFAULT_MAX_ITEMS = 256
"""Bound for lists and maps the models leave unbounded."""
_DROPPED = {"title", "propertyNames", "$defs", "discriminator"}


class CRDGenError(ValueError):
    """A model uses a construct a structural schema cannot express; the message names the field."""


class _WithFactoryDefaults(GenerateJsonSchema):
    """Emit `default` for `default_factory` fields too, so the API server fills what pydantic fills."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return schema.get("default", NoDefault)


def _strip_none(value: Any) -> Any:
    """Defaults must validate against the schema, where null is not allowed."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = defs[ref.rsplit("/", 1)[-1]]
    # Keys beside the $ref (the field's own description, default) win over the model's.
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _reduce_union(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """`X | None` -> X (an absent field is the None); other unions are not structural."""
    branches = [_resolve(b, defs) for b in node["anyOf"] if b != {"type": "null"}]
    if len(branches) != 1:
        raise CRDGenError(f"{path}: a union of {len(branches)} types has no structural schema")
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    return {**branches[0], **outer}


def structural(node: dict[str, Any], defs: dict[str, Any], path: str = "spec") -> dict[str, Any]:
    """One pydantic JSON-schema node -> one structural openAPIV3Schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        node = structural(_reduce_union(node, defs, path), defs, path)
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and value is False:
            continue  # unknown fields are pruned by the server; `false` is not structural
        if key == "properties":
            out[key] = {name: _property(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs, f"{path}[]")
        elif key == "prefixItems":
            out["items"] = _tuple_items(value, defs, path)
        elif key == "additionalProperties":
            out[key] = structural(value, defs, f"{path}.*")
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "default":
            out[key] = _strip_none(value)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out and not out["properties"]:
        del out["properties"]
    _bound(out, path)
    return dict(sorted(out.items()))


def _tuple_items(items: list[dict[str, Any]], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """A tuple's positions as one `items` schema (a structural schema has no per-position ones), so
    their bounds must agree; they used to be dropped (`optim.betas` lost its [0, 1) in the CRD)."""
    schemas = [structural(item, defs, f"{path}[{i}]") for i, item in enumerate(items)]
    if any(schema != schemas[0] for schema in schemas[1:]):
        raise CRDGenError(f"{path}: tuple positions of different schemas have no structural schema")
    return schemas[0]


def _property(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """A named field: structural, and described (`kubectl explain` shows every field)."""
    out = structural(node, defs, path)
    if not out.get("description"):
        raise CRDGenError(f"{path}: field has no description (add a docstring under it)")
    return out


def _bound(node: dict[str, Any], path: str) -> None:
    """Every string, list and map gets a maximum size; CEL cost estimation depends on it."""
    kind = node.get("type")
    if kind == "string" and "enum" not in node and "maxLength" not in node:
        node["maxLength"] = DEFAULT_MAX_LENGTH
    elif kind == "array" and "maxItems" not in node:
        node["maxItems"] = DEFAULT_MAX_ITEMS
    elif kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
        node["maxProperties"] = DEFAULT_MAX_ITEMS


def _describe_missing(schema: dict[str, Any]) -> None:
    """A field whose type is another model and which has no docstring of its own takes that
    model's docstring; a field with neither fails in `_property` (no placeholder text)."""
    defs = schema.get("$defs", {})
    for node in [schema, *defs.values()]:
        for field, sub in node.get("properties", {}).items():
            if sub.get("description"):
                continue
            target = _resolve(sub, defs)
            if "anyOf" in sub:
                target = _reduce_union(sub, defs, field)
            doc = target.get("description") if target is not sub else None
            if doc:
                sub["description"] = doc


def schema_for(model: type[BaseModel], part: str) -> dict[str, Any]:
    """The structural schema of `model.<part>` (spec or status)."""
    schema = model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    _describe_missing(schema)
    return structural(schema["properties"][part], schema.get("$defs", {}), part)


@dataclass(frozen=True)
class Column:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


def _condition(type_: str, field: str) -> str:
    """A filter on the condition's type, never the last list element."""
    return f'.status.conditions[?(@.type=="{type_}")].{field}'


_READY = Column("Ready", _condition("Ready", "status"), description="Ready condition status")
_REASON = Column("Reason", _condition("Ready", "reason"), description="Why it is (not) ready")
_AGE = Column("Age", ".metadata.creationTimestamp", "date")
_MESSAGE = Column(
    "Message", _condition("Ready", "message"), description="Ready condition message", priority=1
)


@dataclass(frozen=True)
class Kind:
    model: type[BaseModel]
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    columns: tuple[Column, ...]
    scale: bool = False

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"


KINDS = (
    Kind(
        SpeculatorDataGen,
        DATAGEN_KIND,
        "speculatordatagens",
        "speculatordatagen",
        ("sdg", "datagen"),
        (
            _READY,
            _REASON,
            Column("Mode", ".spec.mode", description="offline or online"),
            Column("Shards", ".status.progress.shards", description="Shards done/total"),
            Column("Examples", ".status.progress.examples", "integer", "Examples stored"),
            Column(
                "ETA",
                ".status.progress.eta",
                description="The slowest running generator's time to its shard's end",
            ),
            _AGE,
            Column("Workers", ".status.workers", "integer", "Generator pods running", 1),
            Column("Tokens/s", ".status.progress.tokensPerSecond", "number", "Tokens/s of one pod", 1),
            Column("Verifier", ".spec.verifier.nameOrPath", description="Verifier model", priority=1),
            _MESSAGE,
        ),
        scale=True,
    ),
    Kind(
        SpeculatorTraining,
        TRAINING_KIND,
        "speculatortrainings",
        "speculatortraining",
        ("st", "spectrain"),
        (
            _READY,
            _REASON,
            Column("Step", ".status.progress.step", "integer", "Optimizer steps done"),
            Column("Loss", ".status.progress.loss", "number", "Training loss of the last logged window"),
            Column("ETA", ".status.progress.eta", description="Estimated time to the last step"),
            Column("Acceptance", ".status.evaluation.acceptanceLength", "number", "Mean acceptance length"),
            _AGE,
            Column("Val loss", ".status.progress.bestValLoss", "number", "Best validation loss", priority=1),
            Column("Algorithm", ".spec.draft.algorithm", description="eagle3 or hass", priority=1),
            Column("Verifier", ".status.verifier", description="Verifier model", priority=1),
            Column("Data", ".status.dataGen", description="SpeculatorDataGen providing data", priority=1),
            Column("Artifact", ".status.artifact.path", description="Exported speculator", priority=1),
            Column("URL", ".status.artifact.url", description="Where spec.export uploaded it", priority=1),
            Column("Restarts", ".status.trainer.restarts", "integer", "Trainer group restarts", priority=1),
            _MESSAGE,
        ),
    ),
)


def root_schema(kind: Kind) -> dict[str, Any]:
    """The whole object: apiVersion/kind/metadata + spec + status + root-level rules."""
    schema = kind.model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    return {
        "type": "object",
        "description": kind.model.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "maxLength": 253, "description": "specops.dev/v1alpha1"},
            "kind": {"type": "string", "maxLength": 63, "description": kind.kind},
            "metadata": {"type": "object"},
            "spec": schema_for(kind.model, "spec"),
            "status": schema_for(kind.model, "status"),
        },
        "x-kubernetes-validations": schema.get("x-kubernetes-validations", []),
    }


def crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    subresources: dict[str, Any] = {"status": {}}
    if kind.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.workers",
            "statusReplicasPath": ".status.workers",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.name,
            "labels": {"app.kubernetes.io/name": "specops", "app.kubernetes.io/part-of": "specops"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["specops"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": [c.to_dict() for c in kind.columns],
                    "schema": {"openAPIV3Schema": root_schema(kind)},
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    header = f"# Generated by `specops crds` from specops_operator/api.py ({kind.kind}); do not edit.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=120)


def write_crds(out_dir: Path) -> list[Path]:
    """Write one file per kind; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in KINDS:
        path = out_dir / f"{kind.name}.yaml"
        path.write_text(render(kind))
        written.append(path)
    return written


def check_crds(out_dir: Path) -> list[Path]:
    """Files under `out_dir` that differ from what the models generate now."""
    return [
        out_dir / f"{kind.name}.yaml"
        for kind in KINDS
        if not (out_dir / f"{kind.name}.yaml").is_file()
        or (out_dir / f"{kind.name}.yaml").read_text() != render(kind)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("crds"), help="directory to write the CRDs into")
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")


def run(out: Path, check: bool) -> int:
    """`crds` entry point shared by `specops crds` and `python -m specops_operator crds`."""
    if check:
        stale = check_crds(out)
        for path in stale:
            print(f"{path}: differs from the models; run `specops crds --out {out}`")
        return 1 if stale else 0
    for path in write_crds(out):
        print(path)
    return 0
