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


def _controller(obj: Manifest) -> dict[str, Any] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller")), None)


def ownership(existing: Manifest, desired: Manifest, owner_uid: str) -> Ownership:
    controller = _controller(existing)
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


def mutable_patch(existing: Manifest, desired: Manifest, *, suspend: bool) -> Manifest:
    """A merge patch bringing an existing child's mutable knobs to the desired values.

    `suspend` is the CR's own wish. A Job in a Kueue queue is created suspended and resumed by
    Kueue on admission, never by us: we only suspend it when the CR asks.
    """
    patch: Manifest = {}
    queued = KUEUE_QUEUE_LABEL in desired["metadata"]["labels"]
    for path in MUTABLE_PATHS.get(desired["kind"], ()):
        changed, value = _differs(existing, desired, path)
        if path == ("spec", "suspend") and desired["kind"] == "Job" and queued:
            changed, value = suspend and not existing["spec"].get("suspend"), True
        if changed:
            _merge(patch, _nest(path, value))
    return patch
