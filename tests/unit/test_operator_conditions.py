"""Condition upsert, the kstatus/kubectl-wait summary per phase, and which changes become Events."""

from __future__ import annotations

import pytest

from specops_operator.api import Condition
from specops_operator.conditions import Desired, Phase, elapsed, find, lifecycle, merge, transitions, upsert

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def test_upsert_keeps_transition_time_while_status_holds() -> None:
    first = upsert([], Desired("Ready", False, "Starting", "waiting"), generation=1, now=T0)
    again = upsert(first, Desired("Ready", False, "Generating", "3/8 shards"), generation=2, now=T1)
    (cond,) = again
    assert cond["lastTransitionTime"] == T0, "reason and message changes are not transitions"
    assert (cond["reason"], cond["message"], cond["observedGeneration"]) == ("Generating", "3/8 shards", 2)
    flipped = upsert(again, Desired("Ready", True, "Complete"), generation=2, now=T1)
    assert flipped[0]["lastTransitionTime"] == T1 and flipped[0]["status"] == "True"
    unknown = upsert([], Desired("VerifierCompatible", None, "ArchitectureUnknown"), generation=1, now=T0)
    assert unknown[0]["status"] == "Unknown"


def test_conditions_are_valid_metav1_conditions_in_stable_order() -> None:
    conditions = merge([], lifecycle(Phase.RUNNING, "Generating", "2 pods"), generation=3, now=T0)
    assert [c["type"] for c in conditions] == sorted(c["type"] for c in conditions)
    for cond in conditions:
        Condition.model_validate(cond)  # the CRD's schema for conditions
        assert cond["observedGeneration"] == 3


def _truth(phase: Phase) -> dict[str, str]:
    return {c.type: c.wire_status for c in lifecycle(phase, "Because", "why")}


@pytest.mark.parametrize(
    ("phase", "true"),
    [
        (Phase.PENDING, {"Reconciling"}),
        (Phase.RUNNING, {"Reconciling", "Running"}),
        (Phase.SUSPENDED, {"Suspended"}),
        (Phase.COMPLETE, {"Ready", "Complete"}),
        (Phase.FAILED, {"Stalled", "Failed"}),
        (Phase.STALLED, {"Stalled", "Failed"}),
        (Phase.BLOCKED, {"Stalled"}),  # stuck on the cluster or an edit: kubectl wait Failed stays quiet
    ],
)
def test_lifecycle_conditions_per_phase(phase: Phase, true: set[str]) -> None:
    truth = _truth(phase)
    assert set(truth) == {"Ready", "Reconciling", "Stalled", "Suspended", "Running", "Complete", "Failed"}
    assert {t for t, s in truth.items() if s == "True"} == true


def test_ready_carries_the_phase_reason_and_message() -> None:
    ready = next(c for c in lifecycle(Phase.FAILED, "ConfigError", "bad path") if c.type == "Ready")
    assert (ready.status, ready.reason, ready.message) == (False, "ConfigError", "bad path")


def test_transitions_become_events_once() -> None:
    before = merge(
        [], [*lifecycle(Phase.PENDING, "Starting"), Desired("ShardsComplete", False, "InProgress")], 1, T0
    )
    after = merge(
        before,
        [*lifecycle(Phase.RUNNING, "Generating"), Desired("ShardsComplete", False, "InProgress")],
        1,
        T1,
    )
    events = transitions(before, after)
    assert [(e.type, e.reason) for e in events] == [("Ready", "Generating")]  # mirrors stay quiet
    assert not events[0].warning
    assert transitions(after, after) == []
    failed = merge(after, lifecycle(Phase.FAILED, "ConfigError", "exit 2"), 1, T1)
    (event,) = transitions(after, failed)
    assert event.warning and event.reason == "ConfigError"
    first = transitions([], before)
    assert {e.type for e in first} == {"Ready", "ShardsComplete"}


def test_find_missing_condition() -> None:
    assert find([], "Ready") is None


def test_pods_waiting_on_the_cluster_post_a_warning_while_still_reconciling() -> None:
    before = merge([], lifecycle(Phase.PENDING, "Starting"), 1, T0)
    after = merge(before, lifecycle(Phase.PENDING, "Unschedulable", "pod x-0: 0/3 nodes"), 1, T1)
    (event,) = transitions(before, after)
    assert event.warning and event.reason == "Unschedulable"


def test_elapsed_between_timestamps() -> None:
    assert elapsed(T0, T1) == 300.0
