"""Every config and CR field explains itself: `--help` and `kubectl explain` read as documentation.

A description fails when, after dropping the field's own name and filler words, fewer than three
words are left (it only repeats the name), or when it sends the reader elsewhere instead of saying
what the field does.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_snake

from specops import config
from specops_operator import api

ROOT = Path(__file__).resolve().parents[2]
FILLER = {
    "the",
    "a",
    "an",
    "of",
    "for",
    "to",
    "in",
    "on",
    "is",
    "this",
    "field",
    "value",
    "setting",
    "option",
}
REFERENCE = re.compile(r"\(?\bsee [^.;)]*[.;)]?", re.I)


def problem(name: str, description: str | None) -> str | None:
    """Why `description` does not document field `name`, or None when it does."""
    if not description or not description.strip():
        return "no description"
    name_words = set(to_snake(name).split("_"))
    own = REFERENCE.sub(" ", description)  # "see X" is fine beside a description, not instead of one
    words = [w for w in re.findall(r"[a-z0-9]+", own.lower()) if w not in FILLER | name_words]
    if len(words) >= 3:
        return None
    return (
        f"points elsewhere: {description!r}"
        if own != description
        else f"only repeats the name: {description!r}"
    )


def models() -> list[type[BaseModel]]:
    roots: list[type[BaseModel]] = [config.DataGenConfig, config.TrainConfig]
    roots += [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    seen: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen or not model.__module__.startswith(("specops.", "specops_operator.")):
            return
        seen.append(model)
        for info in model.model_fields.values():
            for inner in _types(info.annotation):
                walk(inner)

    for root in roots:
        walk(root)
    return seen


def _types(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _types(arg)


FIELDS = [(m, name) for m in models() for name in m.model_fields]


def test_every_model_field_is_covered() -> None:
    names = {f"{m.__name__}.{n}" for m, n in FIELDS}
    assert {"DataGenConfig.datasets", "OptimConfig.lr", "SpeculatorTrainingSpec.storage"} <= names
    assert len(FIELDS) > 200


@pytest.mark.parametrize(("model", "name"), FIELDS, ids=[f"{m.__name__}.{n}" for m, n in FIELDS])
def test_every_field_has_a_real_description(model: type[BaseModel], name: str) -> None:
    info = model.model_fields[name]
    assert problem(name, info.description) is None, (
        f"{model.__name__}.{name}: {problem(name, info.description)}"
    )


def crd_properties(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, sub in node.get("properties", {}).items():
        yield f"{path}.{key}", sub
        yield from crd_properties(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from crd_properties(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from crd_properties(node["additionalProperties"], f"{path}.*")


@pytest.mark.parametrize("crd", sorted((ROOT / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_kubectl_explain_reads_as_documentation(crd: Path) -> None:
    """What `kubectl explain KIND.spec --recursive` prints: every property's own description."""
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bad = [
        f"{path}: {why}"
        for part in ("spec", "status")
        for path, node in crd_properties(schema["properties"][part], part)
        if (why := problem(path.rsplit(".", 1)[-1], node.get("description")))
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("name", "description", "ok"),
    [
        ("lr", "`lr` of OptimConfig; see the SpecOps workload documentation.", False),
        ("maxSeqLen", "Max seq len.", False),
        ("tensorParallelSize", "vLLM only.", False),
        ("lr", "Peak learning rate of AdamW (default 1e-4).", True),
    ],
)
def test_the_check_tells_placeholders_from_descriptions(name: str, description: str, ok: bool) -> None:
    assert (problem(name, description) is None) == ok
