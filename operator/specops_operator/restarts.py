"""Whole-group restarts of the trainer, decided from status and the trainer Job (pure).

The trainer pods are one torchrun group: when one rank fails, the others cannot go on without
it and a replacement cannot join them. So the trainer Job fails on its first failed pod, and the
operator replaces the whole group: it records the restart (count and cause) in status first, then
deletes the failed Job with foreground propagation (its pods are gone before the Job is), and
creates the next attempt, whose ranks meet in a rendezvous of their own and resume from the
newest checkpoint. The count lives in status, so it survives an operator restart; each Job
carries its attempt number, so a failure is never counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specops import exitcodes
from specops_operator.builders import common
from specops_operator.builders.training import attempt_of
from specops_operator.status import MESSAGE_LIMIT, Group, container_state, failure_detail

Obj = dict[str, Any]
NO_RESTART_REASONS = frozenset({"PodFailurePolicy", "DeadlineExceeded"})
"""Job failure reasons that end the training: the trainer Job's podFailurePolicy fails it only on
a fatal exit code, and `activeDeadlineSeconds` bounds an attempt on purpose."""


def _disruption(pod: Obj) -> Obj:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next(
        (c for c in conditions if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), {}
    )


def _failed_condition(job: Obj) -> Obj:
    """The Job's Failed=True condition ({} while it has not failed)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return dict(next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), {}))


def _failed(pod: Obj) -> bool:
    state = container_state(pod)
    return (pod.get("status") or {}).get("phase") == "Failed" or state.get("exitCode") not in (None, 0)


def cause(job: Obj, pods: Sequence[Obj]) -> Obj:
    """The first failed pod of `job` (ties: a signal or an eviction before a collateral exit 1):
    which pod and rank, its exit code, Kubernetes' reason and the workload's error line."""
    uid = (job.get("metadata") or {}).get("uid")
    mine = [
        p
        for p in pods
        if any(r.get("uid") == uid for r in (p.get("metadata") or {}).get("ownerReferences") or [])
        and _failed(p)
    ]
    job_failed = _failed_condition(job)
    out: Obj = {"attempt": attempt_of(job)}

    def order(pod: Obj) -> tuple[str, bool, str]:
        state = container_state(pod)
        when = str(state.get("finishedAt") or _disruption(pod).get("lastTransitionTime") or "")
        return when, state.get("exitCode") == exitcodes.FAILED, str(pod["metadata"].get("name"))

    if not mine:
        out.update(reason=str(job_failed.get("reason") or "Failed"))
        out["message"] = str(job_failed.get("message") or "the trainer Job failed")[:MESSAGE_LIMIT]
        return out
    pod = min(mine, key=order)
    meta, state = pod["metadata"], container_state(pod)
    index = str((meta.get("annotations") or {}).get(common.INDEX_ANNOTATION) or "")
    disruption = _disruption(pod)
    reason = (
        (pod.get("status") or {}).get("reason") or disruption.get("reason") or state.get("reason") or "Error"
    )
    message = failure_detail([pod]) or str(
        (pod.get("status") or {}).get("message")
        or disruption.get("message")
        or job_failed.get("message")
        or ""
    )
    out.update(pod=meta.get("name"), reason=str(reason), message=message.strip()[-MESSAGE_LIMIT:])
    if index.isdigit():
        out["rank"] = int(index)
    if state.get("exitCode") is not None:
        out["exitCode"] = int(state["exitCode"])
    return out


def decide(prior: Obj, job: Obj | None, pods: Sequence[Obj], max_restarts: int) -> Group:
    """The group's next step from the recorded restarts (`prior` = status.trainer), the trainer
    Job as it is now and its pods (read when it failed)."""
    restarts = int(prior.get("restarts") or 0)
    last = prior.get("lastFailure")
    if job is None:
        return Group(restarts, last, attempt=restarts)
    attempt = attempt_of(job)
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return Group(max(restarts, attempt), last, attempt=None)  # going away: wait for it to be gone
    if attempt < restarts:  # a failed attempt already counted; its deletion did not happen yet
        return Group(restarts, last, attempt=None, teardown=True)
    restarts = attempt  # never behind the Job the cluster runs (status lost or restored)
    failed = _failed_condition(job)
    if not failed:
        return Group(restarts, last, attempt=restarts)
    why = cause(job, pods)
    code = why.get("exitCode")
    if code in exitcodes.FATAL or failed.get("reason") in NO_RESTART_REASONS:
        return Group(restarts, why, attempt=restarts, fatal_code=code if code in exitcodes.FATAL else None)
    if restarts >= max_restarts:
        return Group(restarts, why, attempt=restarts, exhausted=True)
    return Group(restarts + 1, why, attempt=None, teardown=True)
