"""GitOps health of our resources: Argo CD's Lua script, Flux's CEL expressions, kstatus.

The Lua runs in a real Lua interpreter (lupa) exactly as Argo CD runs it (global `obj`, a
returned table); the CEL runs in cel-python with Flux's evaluation order (observedGeneration
gate, then inProgress, failed, current; none true = in progress). Statuses come both from the
static samples next to the script and from the operator's own status functions, so a change in
the conditions the operator writes that breaks GitOps health fails here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from lupa import LuaRuntime

from specops_operator.conditions import Phase, lifecycle, merge
from specops_operator.status import settled_status, stalled_status, waiting_status

ROOT = Path(__file__).resolve().parents[2]
ARGO = ROOT / "gitops" / "argocd"
FLUX = ROOT / "gitops" / "flux" / "kustomization.yaml"
KINDS = ("SpeculatorDataGen", "SpeculatorTraining")
NOW = "2026-11-26T10:00:00Z"
Obj = dict[str, Any]


def resource(status: Obj | None, generation: int = 1, kind: str = "SpeculatorTraining") -> Obj:
    obj: Obj = {
        "apiVersion": "specops.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ml", "generation": generation},
    }
    if status is not None:
        obj["status"] = status
    return obj


def phase_status(phase: Phase, generation: int = 1, reason: str = "Because", message: str = "") -> Obj:
    return {
        "observedGeneration": generation,
        "conditions": merge([], lifecycle(phase, reason, message), generation, NOW),
    }


# --------------------------------------------------------------------------- Argo CD


def argo_health(obj: Obj) -> Obj:
    """Run health.lua as Argo CD does: `obj` is a global, the script returns {status, message}."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((ARGO / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def _cases() -> list[Obj]:
    return list(yaml.safe_load((ARGO / "health_test.yaml").read_text())["tests"])


@pytest.mark.parametrize("case", _cases(), ids=lambda c: Path(c["inputPath"]).stem)
def test_argocd_health_test_cases(case: Obj) -> None:
    obj = yaml.safe_load((ARGO / case["inputPath"]).read_text())
    assert argo_health(obj) == case["healthStatus"]


def test_health_tests_cover_every_argo_status() -> None:
    statuses = {case["healthStatus"]["status"] for case in _cases()}
    assert statuses == {"Progressing", "Healthy", "Degraded", "Suspended"}
    used = {case["inputPath"] for case in _cases()}
    on_disk = {f"testdata/{p.name}" for p in (ARGO / "testdata").glob("*.yaml")}
    assert used == on_disk, "every sample is a test case"


ARGO_BY_PHASE = {
    Phase.PENDING: "Progressing",
    Phase.RUNNING: "Progressing",
    Phase.COMPLETE: "Healthy",
    Phase.SUSPENDED: "Suspended",
    Phase.FAILED: "Degraded",
    Phase.STALLED: "Degraded",
    Phase.BLOCKED: "Degraded",  # stuck on something outside the run (quota, storage, a reference)
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", list(Phase))
def test_argocd_health_of_every_operator_phase(phase: Phase, kind: str) -> None:
    health = argo_health(resource(phase_status(phase, 2, "Why", "details"), generation=2, kind=kind))
    assert health["status"] == ARGO_BY_PHASE[phase]
    if health["status"] == "Degraded":
        assert health["message"] == "Why: details"


def test_argocd_waits_for_the_current_generation() -> None:
    stale = resource(phase_status(Phase.COMPLETE, 1), generation=2)
    assert argo_health(stale)["status"] == "Progressing"
    settled = resource(settled_status(2, phase_status(Phase.COMPLETE, 1)), generation=2)
    assert argo_health(settled)["status"] == "Healthy"


def test_argocd_configmap_embeds_the_script_for_both_kinds() -> None:
    data = yaml.safe_load((ARGO / "argocd-cm-patch.yaml").read_text())["data"]
    script = (ARGO / "health.lua").read_text()
    assert set(data) == {f"resource.customizations.health.specops.dev_{kind}" for kind in KINDS}
    for embedded in data.values():
        assert embedded == script


# --------------------------------------------------------------------------- Flux


def flux_exprs() -> dict[str, Obj]:
    spec = yaml.safe_load(FLUX.read_text())["spec"]
    return {entry["kind"]: entry for entry in spec["healthCheckExprs"]}


@cache
def cel_program(expression: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def flux_status(obj: Obj, exprs: Obj) -> str:
    """Flux's evaluation (RFC 0009): generation gate, then inProgress, failed, current."""
    status = obj.get("status") or {}
    if "observedGeneration" in status and status["observedGeneration"] != obj["metadata"].get("generation"):
        return "InProgress"
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    for key, verdict in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key in exprs and cel_program(exprs[key]).evaluate(activation):
            return verdict
    return "InProgress"


FLUX_BY_PHASE = {
    Phase.PENDING: "InProgress",
    Phase.RUNNING: "InProgress",
    Phase.COMPLETE: "Current",
    Phase.SUSPENDED: "InProgress",  # not done: a suspended run holds dependents back
    Phase.FAILED: "Failed",
    Phase.STALLED: "Failed",
    Phase.BLOCKED: "Failed",  # kstatus: Stalled=True, whatever Failed says
}


def test_flux_declares_both_kinds() -> None:
    exprs = flux_exprs()
    assert set(exprs) == set(KINDS)
    for entry in exprs.values():
        assert entry["apiVersion"] == "specops.dev/v1alpha1" and entry["current"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", list(Phase))
def test_flux_health_of_every_operator_phase(phase: Phase, kind: str) -> None:
    obj = resource(phase_status(phase, 3), generation=3, kind=kind)
    assert flux_status(obj, flux_exprs()[kind]) == FLUX_BY_PHASE[phase]


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("running", "InProgress"),
        ("pending", "InProgress"),
        ("stale-generation", "InProgress"),
        ("complete", "Current"),
        ("failed", "Failed"),
        ("stalled", "Failed"),
        ("suspended", "InProgress"),
    ],
)
def test_flux_health_of_the_samples(sample: str, expected: str) -> None:
    obj = yaml.safe_load((ARGO / "testdata" / f"{sample}.yaml").read_text())
    assert flux_status(obj, flux_exprs()[obj["kind"]]) == expected


def test_flux_cannot_judge_a_resource_without_status() -> None:
    """CEL errors on a missing `status`; Flux then keeps waiting (until its timeout)."""
    obj = yaml.safe_load((ARGO / "testdata" / "no-status.yaml").read_text())
    with pytest.raises(celpy.CELEvalError):
        flux_status(obj, flux_exprs()[obj["kind"]])


# --------------------------------------------------------------------------- kstatus


def kstatus(obj: Obj) -> str:
    """kstatus for a generic custom resource: generation, then Reconciling, then Stalled."""
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return "InProgress"
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    if conditions.get("Stalled") == "True":
        return "Failed"
    return "Current"


KSTATUS_BY_PHASE = {
    Phase.PENDING: "InProgress",
    Phase.RUNNING: "InProgress",
    Phase.COMPLETE: "Current",
    Phase.SUSPENDED: "Current",
    Phase.FAILED: "Failed",
    Phase.STALLED: "Failed",
    Phase.BLOCKED: "Failed",  # kstatus: Stalled=True, whatever Failed says
}


@pytest.mark.parametrize("phase", list(Phase))
def test_kstatus_of_every_operator_phase(phase: Phase) -> None:
    status = phase_status(phase, 4)
    assert kstatus(resource(status, generation=4)) == KSTATUS_BY_PHASE[phase]
    assert {c["observedGeneration"] for c in status["conditions"]} == {4}
    assert kstatus(resource(status, generation=5)) == "InProgress", "a newer spec is not yet observed"


def test_operator_status_writers_record_the_generation_they_saw() -> None:
    prior = phase_status(Phase.RUNNING, 1)
    for written in (
        waiting_status(7, prior, "SpeculatorDataGen 'd' not found", NOW, overdue=False),
        waiting_status(7, prior, "SpeculatorDataGen 'd' not found", NOW, overdue=True),
        stalled_status(7, prior, "InvalidSpec", "spec.x: bad", NOW, None),
        settled_status(7, phase_status(Phase.COMPLETE, 1)),
    ):
        assert written["observedGeneration"] == 7
        assert {c["observedGeneration"] for c in written["conditions"]} == {7}
    assert (
        kstatus(resource(waiting_status(7, prior, "waiting", NOW, overdue=False), generation=7))
        == "InProgress"
    )
    assert kstatus(resource(waiting_status(7, prior, "waiting", NOW, overdue=True), generation=7)) == "Failed"
    assert (
        kstatus(resource(stalled_status(7, prior, "InvalidSpec", "bad", NOW, None), generation=7)) == "Failed"
    )
