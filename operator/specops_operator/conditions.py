"""metav1.Condition bookkeeping and the kstatus summary, as pure functions over wire dicts.

Every resource carries the same lifecycle conditions so GitOps tools and `kubectl wait` agree:
kstatus' `Ready`/`Reconciling`/`Stalled`, plus `Suspended`/`Running`/`Complete`/`Failed`
(always present, True or False), plus domain conditions set by `status`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

Cond = dict[str, Any]


class Phase(StrEnum):
    """Where a run is; each phase maps to exactly one set of lifecycle conditions."""

    PENDING = "Pending"
    """Validated, children being created or waiting for data / admission."""
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    COMPLETE = "Complete"
    FAILED = "Failed"
    STALLED = "Stalled"
    """The spec cannot be run as written (a validation failure); nothing was created."""
    BLOCKED = "Blocked"
    """Cannot progress until something outside the run changes (an edit reverted, quota, storage,
    a missing reference): Stalled, but nothing failed, so `kubectl wait --for=condition=Failed`
    does not fire and the run goes on once the cause is fixed."""


@dataclass(frozen=True)
class Desired:
    """A condition as computed, before timestamps."""

    type: str
    status: bool | None
    reason: str
    message: str = ""

    @property
    def wire_status(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def elapsed(since: str, now: str) -> float:
    """Seconds between two RFC 3339 timestamps (`creationTimestamp`, `now_rfc3339()`)."""
    parse = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    return (parse(now) - parse(since)).total_seconds()


def find(conditions: Iterable[Cond], type_: str) -> Cond | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Iterable[Cond], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.get("status") == "True"


def upsert(conditions: Sequence[Cond], desired: Desired, generation: int, now: str) -> list[Cond]:
    """Set one condition; `lastTransitionTime` changes only when the status changes."""
    previous = find(conditions, desired.type)
    status = desired.wire_status
    changed = previous is None or previous.get("status") != status
    entry: Cond = {
        "type": desired.type,
        "status": status,
        "reason": desired.reason,
        "message": desired.message[:32768],
        "lastTransitionTime": now if changed or previous is None else previous["lastTransitionTime"],
        "observedGeneration": generation,
    }
    out = [c for c in conditions if c.get("type") != desired.type]
    out.append(entry)
    return out


def merge(conditions: Sequence[Cond], desired: Iterable[Desired], generation: int, now: str) -> list[Cond]:
    """Apply many `upsert`s; the result is ordered by type so status patches are stable."""
    out = list(conditions)
    for item in desired:
        out = upsert(out, item, generation, now)
    return sorted(out, key=lambda c: str(c["type"]))


def lifecycle(phase: Phase, reason: str, message: str = "") -> list[Desired]:
    """kstatus summary + kubectl-wait conditions for one phase.

    kstatus: Reconciling=True while work is under way, Stalled=True when it cannot progress
    (invalid spec or failed run), neither when it is settled (complete or suspended).
    """
    active = phase in (Phase.PENDING, Phase.RUNNING)
    stuck = phase in (Phase.FAILED, Phase.STALLED, Phase.BLOCKED)
    failed = phase in (Phase.FAILED, Phase.STALLED)
    return [
        Desired("Ready", phase == Phase.COMPLETE, reason, message),
        Desired("Reconciling", active, reason if active else "Settled", message if active else ""),
        Desired("Stalled", stuck, reason if stuck else "Progressing", message if stuck else ""),
        Desired(
            "Suspended", phase == Phase.SUSPENDED, reason if phase == Phase.SUSPENDED else "NotSuspended"
        ),
        Desired("Running", phase == Phase.RUNNING, reason if phase == Phase.RUNNING else "NotRunning"),
        Desired("Complete", phase == Phase.COMPLETE, reason if phase == Phase.COMPLETE else "NotComplete"),
        Desired("Failed", failed, reason if failed else "NotFailed", message if failed else ""),
    ]


@dataclass(frozen=True)
class Transition:
    """A condition whose status or reason changed: one Kubernetes Event."""

    type: str
    status: str
    reason: str
    message: str
    warning: bool


_QUIET = frozenset({"Reconciling", "Stalled", "Suspended", "Running", "Complete", "Failed"})
"""Mirrors of `Ready`'s reason; one Event per phase change is enough."""
WARNING_REASONS = frozenset({"Unschedulable", "PodsNotStarting", "WaitingForStorage"})
"""Reasons of a run still Reconciling that need someone's attention (no GPU node, no volume):
posted as Warnings although nothing is Stalled yet."""


def transitions(before: Sequence[Cond], after: Sequence[Cond]) -> list[Transition]:
    """Changes worth an Event: Ready's reason (the phase) and every domain condition.

    Events are Warnings while the resource is Stalled (invalid spec or failed run), and for the
    `WARNING_REASONS` of a run that waits on the cluster.
    """
    stalled = is_true(after, "Stalled")
    events = []
    for cond in after:
        type_ = str(cond["type"])
        old = find(before, type_)
        if type_ in _QUIET or (
            old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]
        ):
            continue
        warning = stalled or str(cond["reason"]) in WARNING_REASONS
        events.append(
            Transition(type_, str(cond["status"]), str(cond["reason"]), str(cond["message"]), warning)
        )
    return events
