"""CRD generation: committed CRDs match the models, schemas are structural and bounded,
presentation (columns, names, subresources) is what `kubectl` users rely on."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import celpy
import jsonschema
import pytest
import yaml
from _operator_support import CRDS, ROOT, crd_schema
from pydantic import Field

from specops.commands import crds as crds_command
from specops.config import Contract
from specops_operator import crdgen
from specops_operator.__main__ import main as operator_main


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")


def _crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]


def test_committed_crds_match_the_models() -> None:
    stale = crdgen.check_crds(CRDS)
    assert stale == [], f"run `specops crds --out crds` ({[p.name for p in stale]} drifted)"


def _specops_crds(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    crds_command.register(parser)
    return crds_command.main(parser.parse_args(argv))


def test_both_entry_points_write_the_same_files(tmp_path: Path) -> None:
    assert _specops_crds(["--out", str(tmp_path / "a")]) == 0
    assert operator_main(["crds", "--out", str(tmp_path / "b")]) == 0
    for path in (tmp_path / "a").iterdir():
        assert path.read_text() == (tmp_path / "b" / path.name).read_text() == (CRDS / path.name).read_text()
    assert operator_main(["crds", "--check", "--out", str(tmp_path / "b")]) == 0
    (tmp_path / "b" / path.name).write_text("edited")
    assert operator_main(["crds", "--check", "--out", str(tmp_path / "b")]) == 1


@pytest.mark.parametrize("kind", ["SpeculatorDataGen", "SpeculatorTraining"])
def test_schema_is_structural_and_bounded(kind: str) -> None:
    schema = crd_schema(kind)
    for path, node in _nodes(schema):
        if path == ".metadata":
            assert node == {"type": "object"}
            continue
        assert "$ref" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if "properties" in node and "additionalProperties" in node:
            raise AssertionError(f"{path}: properties and additionalProperties are exclusive")
        kind_ = node.get("type")
        if kind_ == "string":
            assert "maxLength" in node or "enum" in node, f"{path}: unbounded string"
        if kind_ == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if kind_ == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: unbounded map"
        for name, sub in (node.get("properties") or {}).items():
            if (path, name) != ("", "metadata"):  # the server owns metadata's schema
                assert sub.get("description"), (
                    f"{path}.{name}: no description (kubectl explain shows nothing)"
                )


@pytest.mark.parametrize("kind", ["SpeculatorDataGen", "SpeculatorTraining"])
def test_defaults_validate_against_their_own_schema(kind: str) -> None:
    for path, node in _nodes(crd_schema(kind)):
        if "default" in node:
            errors = list(jsonschema.Draft4Validator(node).iter_errors(node["default"]))
            assert errors == [], f"{path}: {errors[0].message}"


@pytest.mark.parametrize("kind", ["SpeculatorDataGen", "SpeculatorTraining"])
def test_every_cel_rule_compiles(kind: str) -> None:
    env = celpy.Environment()
    rules = [r for _, node in _nodes(crd_schema(kind)) for r in node.get("x-kubernetes-validations") or []]
    assert len(rules) > 5
    for rule in rules:
        env.compile(rule["rule"])
        assert rule["message"]


def test_presentation() -> None:
    by_kind = {c["spec"]["names"]["kind"]: c for c in _crds()}
    assert set(by_kind) == {"SpeculatorDataGen", "SpeculatorTraining"}
    for crd in by_kind.values():
        names = crd["spec"]["names"]
        assert names["categories"] == ["specops"] and names["shortNames"]
        version = crd["spec"]["versions"][0]
        assert version["subresources"]["status"] == {}
        columns = version["additionalPrinterColumns"]
        for column in columns:
            if "conditions" in column["jsonPath"]:
                assert '[?(@.type=="' in column["jsonPath"], column
        assert [c["name"] for c in columns[:2]] == ["Ready", "Reason"]
        assert any(c.get("priority") == 1 for c in columns), "nothing extra for -o wide"
    for kind in by_kind:  # the live estimate the operator reads from the running pods
        columns = by_kind[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
        assert {"name": "ETA", "jsonPath": ".status.progress.eta"}.items() <= next(
            c for c in columns if c["name"] == "ETA"
        ).items(), kind
    scale = by_kind["SpeculatorDataGen"]["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.workers",
        "statusReplicasPath": ".status.workers",
        "labelSelectorPath": ".status.selector",
    }
    assert "scale" not in by_kind["SpeculatorTraining"]["spec"]["versions"][0]["subresources"]


def test_condition_list_is_a_map_keyed_by_type() -> None:
    conditions = crd_schema("SpeculatorTraining")["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_factory_defaults_are_materialized() -> None:
    spec = crd_schema("SpeculatorDataGen")["properties"]["spec"]["properties"]
    assert spec["broker"]["default"]["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert spec["storage"]["properties"]["accessModes"]["default"] == ["ReadWriteMany"]
    assert "default" not in spec["storage"]  # optional without a default stays absent


def test_unions_and_undescribed_fields_are_refused() -> None:
    class Union(Contract):
        value: int | str = 1
        """Either."""

    class Undescribed(Contract):
        value: Annotated[int, Field(ge=0)] = 1

    schema = Union.model_json_schema(by_alias=True)
    with pytest.raises(crdgen.CRDGenError, match=r"spec\.value: a union of 2 types"):
        crdgen.structural(schema, {})
    schema = Undescribed.model_json_schema(by_alias=True)
    with pytest.raises(crdgen.CRDGenError, match=r"spec.value: field has no description"):
        crdgen.structural(schema, {})


def test_crds_are_what_the_helm_chart_would_ship() -> None:
    for crd in _crds():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.specops.dev"
        assert crd["spec"]["scope"] == "Namespaced"
    assert (ROOT / "crds").is_dir()


def test_tuple_positions_keep_their_bounds() -> None:
    """`optim.betas` lost its [0, 1) bounds in the CRD: prefixItems became a bare `{type: number}`."""
    Unit = Annotated[float, Field(ge=0.0, lt=1.0)]

    class Pair(Contract):
        value: tuple[Unit, Unit] = (0.5, 0.5)
        """Two of them."""

    class Mixed(Contract):
        value: tuple[Unit, Annotated[float, Field(ge=0.0)]] = (0.5, 2.0)
        """Positions bounded differently."""

    items = crdgen.structural(Pair.model_json_schema(by_alias=True), {})["properties"]["value"]
    assert items["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0, "exclusiveMaximum": True}
    assert (items["minItems"], items["maxItems"]) == (2, 2)
    with pytest.raises(crdgen.CRDGenError, match=r"spec\.value: tuple positions of different schemas"):
        crdgen.structural(Mixed.model_json_schema(by_alias=True), {})
