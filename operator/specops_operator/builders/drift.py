"""What to do with a child that already exists: keep it, adopt it, refuse it, or patch a knob.

Strict adoption: an object is ours when its controller ownerReference is our CR's uid. An object
with no controller that carries our instance/kind labels (left by `--cascade=orphan`, or a
retained PVC of a CR that was deleted and re-created) is adopted. Anything else with the same
name is someone else's: we never take it over, the CR stalls with `ChildConflict`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from specops_operator.builders.common import INSTANCE_LABEL, KIND_LABEL, KUEUE_QUEUE_LABEL, Manifest


class Ownership(StrEnum):
    OURS = "ours"
    ADOPT = "adopt"
    CONFLICT = "conflict"


def controller_of(obj: Manifest) -> dict[str, Any] | None:
    """The ownerReference marked `controller` (the object that manages this one), if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller")), None)


def ownership(existing: Manifest, desired: Manifest, owner_uid: str) -> Ownership:
    controller = controller_of(existing)
    if controller is not None:
        return Ownership.OURS if controller.get("uid") == owner_uid else Ownership.CONFLICT
    ours = (existing.get("metadata") or {}).get("labels") or {}
    wanted = desired["metadata"]["labels"]
    if all(ours.get(k) == wanted[k] for k in (INSTANCE_LABEL, KIND_LABEL)):
        return Ownership.ADOPT
    return Ownership.CONFLICT


def adoption_patch(desired: Manifest) -> Manifest:
    """Add our ownerReference (none for retained PVCs, which must outlive the CR)."""
    refs = desired["metadata"].get("ownerReferences")
    return {"metadata": {"ownerReferences": refs}} if refs else {}


def _differs(existing: Manifest, desired: Manifest, path: tuple[str, ...]) -> tuple[bool, Any]:
    have: Any = existing
    want: Any = desired
    for key in path:
        have = (have or {}).get(key)
        want = (want or {}).get(key)
    return have != want, want


def _nest(path: tuple[str, ...], value: Any) -> Manifest:
    out: Manifest = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


def _merge(into: Manifest, patch: Manifest) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


MUTABLE_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Job": (
        ("spec", "parallelism"),
        ("spec", "suspend"),
        ("spec", "activeDeadlineSeconds"),
        ("spec", "ttlSecondsAfterFinished"),
    ),
    "StatefulSet": (("spec", "replicas"),),
    "SpeculatorDataGen": (("spec", "suspend"),),
}
"""The only fields the operator changes on existing children: the CR's mutable knobs."""


def mutable_patch(existing: Manifest, desired: Manifest) -> Manifest:
    """A merge patch bringing an existing child's mutable knobs to the desired values.

    A Job in a Kueue queue is created suspended, and from then on
    Kueue alone flips its `suspend` (admission, preemption) and owns its `parallelism` (what it
    admitted): the CR's suspend reaches Kueue through the Workload (`workload_patch`).
    """
    patch: Manifest = {}
    kueue = desired["kind"] == "Job" and KUEUE_QUEUE_LABEL in desired["metadata"]["labels"]
    for path in MUTABLE_PATHS.get(desired["kind"], ()):
        if kueue and path in KUEUE_OWNED:
            continue
        changed, value = _differs(existing, desired, path)
        if changed:
            _merge(patch, _nest(path, value))
    return patch


KUEUE_OWNED = (("spec", "suspend"), ("spec", "parallelism"))
"""Fields of a queued Job that Kueue manages."""


def workload_patch(workload: Manifest, *, suspend: bool) -> Manifest:
    """Deactivate (or re-activate) a Job's Kueue Workload: Kueue then evicts and suspends the Job
    (or queues it again), which is how a queued Job is suspended without a tug of war."""
    active = (workload.get("spec") or {}).get("active", True)
    return {"spec": {"active": not suspend}} if active == suspend else {}


def queued_scaling(applied: Manifest, spec: Manifest, labels: dict[str, str]) -> list[str]:
    """`workers` may change (`kubectl scale`) except under Kueue, which admitted the Job with its
    parallelism: refused with a message rather than changed under Kueue's feet."""
    queue = labels.get(KUEUE_QUEUE_LABEL)
    if queue is None or applied.get("workers", 1) == spec.get("workers", 1):
        return []
    return [
        f"workers cannot change while the resource is queued in Kueue (queue {queue!r}, admitted with "
        f"workers={applied.get('workers', 1)}): set it back, or create a new resource"
    ]
