"""What the real API server does with our CRDs, before any operator runs.

Schema validation with field-named messages, pruning, the status subresource, printer columns
and `kubectl explain` descriptions, and the harness itself (the fake kubelet completes a Job).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _controlplane import ControlPlane, FakeKubelet, until
from _resources import example

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]


def test_crds_are_served_with_short_names(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("api-resources", "--api-group=specops.dev", "--no-headers").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert set(rows) == {"speculatortrainings", "speculatordatagens"}
    assert rows["speculatortrainings"][1].split(",") == ["st", "spectrain"]
    assert rows["speculatortrainings"][-1] == "SpeculatorTraining"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("spec", "draft", "speculativeTokens"), 0, "spec.draft.speculativeTokens"),
        (("spec", "draft", "algorithm"), "medusa", "spec.draft.algorithm"),
        (("spec", "epochs"), "many", "spec.epochs"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(
    control_plane: ControlPlane, ns: str, path: tuple[str, ...], value: Any, field: str
) -> None:
    cr = example("hass-train.yaml", "SpeculatorTraining")
    node = cr
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    result = control_plane.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(cr), check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr
    assert (
        control_plane.kube().get("specops.dev/v1alpha1", "SpeculatorTraining", ns, cr["metadata"]["name"])
        is None
    )


def test_unknown_fields_are_pruned_and_defaults_applied(control_plane: ControlPlane, ns: str) -> None:
    """v1.20 prunes unknown fields silently (newer servers with strict field validation reject them)."""
    cr = example("hass-train.yaml", "SpeculatorTraining")
    cr["spec"]["notAField"] = 1
    created = control_plane.kube().create({**cr, "metadata": {**cr["metadata"], "namespace": ns}})
    assert "notAField" not in created["spec"]
    assert created["spec"]["draft"]["algorithm"] == "hass"
    assert "suspend" in created["spec"], "server-side defaulting from the generated schema"


def test_printer_columns_and_status_subresource(control_plane: ControlPlane, ns: str) -> None:
    kube = control_plane.kube()
    cr = example("hass-train.yaml", "SpeculatorTraining")
    name = cr["metadata"]["name"]
    kube.create({**cr, "metadata": {**cr["metadata"], "namespace": ns}})
    # A status in the main resource is ignored: only the status subresource writes it.
    ignored = kube.patch("specops.dev/v1alpha1", "SpeculatorTraining", ns, name, {"status": {"dataGen": "x"}})
    assert "status" not in ignored or "dataGen" not in ignored["status"]
    status = {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Training",
                "message": "",
                "lastTransitionTime": "2026-11-26T10:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "progress": {"step": 1200, "loss": 1.75, "eta": "1h30m", "bestValLoss": 1.25},
        "evaluation": {"acceptanceLength": 2.5, "perPosition": [0.8], "lossless": True, "prompts": 8},
        "dataGen": "qwen3-8b-sharegpt",
        "verifier": "Qwen/Qwen3-8B",
    }
    kube.patch(
        "specops.dev/v1alpha1", "SpeculatorTraining", ns, name, {"status": status}, subresource="status"
    )
    table = control_plane.kubectl("get", "speculatortrainings", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "REASON", "STEP", "LOSS", "ETA", "ACCEPTANCE", "AGE"]
    assert table[1].split()[:7] == [name, "False", "Training", "1200", "1.75", "1h30m", "2.5"]
    wide = control_plane.kubectl("get", "st", "-n", ns, "-o", "wide").stdout.splitlines()
    assert {"ALGORITHM", "VERIFIER", "DATA", "VAL"} <= set(wide[0].split())  # VAL LOSS: best validation
    assert {"hass", "Qwen/Qwen3-8B", "qwen3-8b-sharegpt", "1.25"} <= set(wide[1].split())


def test_explain_describes_spec_fields(control_plane: ControlPlane) -> None:
    # v1.20 serves OpenAPI v2 only; kubectl >= 1.27 explains from v3 unless told otherwise. The
    # server publishes a new CRD's schema there a few seconds after the CRD is Established.
    explain = ("explain", "speculatortraining.spec.draft.speculativeTokens", "--output=plaintext-openapiv2")
    out = until(
        lambda: control_plane.kubectl(*explain, check=False).stdout, timeout=30, what="the CRD's OpenAPI"
    )
    assert "DESCRIPTION" in out.upper()
    described = [
        line
        for line in out.splitlines()[out.upper().splitlines().index("DESCRIPTION:") + 1 :]
        if line.strip()
    ]
    assert described and "<empty>" not in described[0]


def test_fake_kubelet_completes_a_job(
    control_plane: ControlPlane, kubelet: FakeKubelet, ns: str, tmp_path: Path
) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello", "namespace": ns},
        "spec": {
            "completions": 2,
            "parallelism": 1,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "workload", "image": "busybox"}]}
            },
        },
    }
    kube = control_plane.kube()
    kube.create(job)

    def complete() -> bool:
        got = kube.get("batch/v1", "Job", ns, "hello") or {}
        return any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in (got.get("status") or {}).get("conditions") or []
        )

    kubelet.drive(ns, {"job-name": "hello"}, complete)
    done = kube.get("batch/v1", "Job", ns, "hello")
    assert done is not None and done["status"]["succeeded"] == 2
    until(lambda: len(kubelet.pods(ns, {"job-name": "hello"})) == 2, what="both pods kept")
