"""The trainer group's restart decision (`specops_operator.restarts`), case by case."""

from __future__ import annotations

from typing import Any

from specops_operator.restarts import cause, decide

Obj = dict[str, Any]
UID = "job-uid"


def _job(attempt: int = 0, reason: str | None = "BackoffLimitExceeded", **meta: Any) -> Obj:
    conditions = (
        [{"type": "Failed", "status": "True", "reason": reason, "message": "job says"}] if reason else []
    )
    return {
        "metadata": {
            "name": "t-train",
            "uid": UID,
            "annotations": {"specops.dev/attempt": str(attempt)},
            **meta,
        },
        "status": {"conditions": conditions},
    }


def _pod(
    name: str, index: int, code: int | None, at: str = "2026-01-01T00:00:10Z", owner: str = UID, **status: Any
) -> Obj:
    state = {"terminated": {"exitCode": code, "finishedAt": at, "reason": "Error", "message": ""}}
    return {
        "metadata": {
            "name": name,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            "ownerReferences": [{"kind": "Job", "uid": owner}],
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "workload", "state": state if code is not None else {}}],
            **status,
        },
    }


def test_the_killed_rank_is_the_cause_not_the_peer_that_exited_1_in_the_same_second() -> None:
    pods = [_pod("t-train-a", 0, 1), _pod("t-train-b", 1, 137), _pod("other", 1, 2, owner="older-job")]
    why = cause(_job(), pods)
    assert (why["pod"], why["rank"], why["exitCode"], why["attempt"]) == ("t-train-b", 1, 137, 0)
    group = decide({}, _job(), pods, max_restarts=3)
    assert (group.restarts, group.attempt, group.teardown) == (1, None, True), (
        "another Job's exit 2 is not ours"
    )


def test_an_evicted_rank_is_restarted_with_kubernetes_reason() -> None:
    evicted = _pod("t-train-a", 0, None, reason="Evicted", message="The node was low on memory.")
    group = decide({"restarts": 1}, _job(attempt=1), [evicted], max_restarts=3)
    assert group.restarts == 2 and group.teardown
    assert group.last_failure == {
        "attempt": 1,
        "pod": "t-train-a",
        "rank": 0,
        "reason": "Evicted",
        "message": "The node was low on memory.",
    }


def test_fatal_codes_and_deadlines_are_not_restarted() -> None:
    config = decide({}, _job(), [_pod("t-train-a", 0, 3)], max_restarts=3)
    assert (config.fatal_code, config.attempt, config.teardown, config.restarts) == (3, 0, False, 0)
    late = decide({}, _job(reason="DeadlineExceeded"), [], max_restarts=3)
    assert (late.fatal_code, late.attempt, late.teardown, late.exhausted) == (None, 0, False, False)
    assert late.last_failure == {"attempt": 0, "reason": "DeadlineExceeded", "message": "job says"}


def test_one_failure_is_counted_once_and_no_attempt_runs_beside_a_dying_one() -> None:
    recorded = {"restarts": 1, "lastFailure": {"attempt": 0}}
    pending = decide(recorded, _job(attempt=0), [_pod("t-train-a", 0, 1)], max_restarts=3)
    assert (pending.restarts, pending.attempt, pending.teardown) == (1, None, True)
    dying = decide(recorded, _job(attempt=0, deletionTimestamp="2026-01-01T00:00:00Z"), [], max_restarts=3)
    assert (dying.restarts, dying.attempt, dying.teardown) == (1, None, False)
    assert decide(recorded, None, [], max_restarts=3).attempt == 1
    running = decide(recorded, _job(attempt=1, reason=None), [], max_restarts=3)
    assert (running.attempt, running.teardown, running.last_failure) == (1, False, {"attempt": 0})
    exhausted = decide({"restarts": 3}, _job(attempt=3), [_pod("t-train-a", 0, 137)], max_restarts=3)
    assert exhausted.exhausted and exhausted.restarts == 3 and not exhausted.teardown
