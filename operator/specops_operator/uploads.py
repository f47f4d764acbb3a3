"""The upload Job's next step when `spec.export` may have changed since it was made (pure).

A Job cannot change its pod template, so an upload Job made for another export (or before the
user asked for a retry with a new `specops.dev/retry-upload` value) is replaced: deleted with
foreground propagation (its pod goes first), then made again from the spec as it is now. One
still running is left to finish (a half-done upload is worse than a late one), then replaced; one
that succeeded for another export is replaced too (the user named another destination). Without
`spec.export` a Job not started is cancelled; a finished one keeps its outcome.

`status.upload` records which export the Published condition describes, so a change is seen
after the run completed and after the TTL removed the Job, and a recorded outcome is never
uploaded twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specops_operator.builders.publish import UploadKey
from specops_operator.conditions import find, is_true
from specops_operator.jobs import JobView

Obj = dict[str, Any]
IN_FLIGHT = frozenset({"Uploading"})
"""Published reasons of an upload not ended yet."""
FINAL = frozenset({"Uploaded", "UploadFailed"})
"""Published reasons of an upload that ended: its Job is never made again for the same key."""
SKIPPED = frozenset({"Disabled", "NoPromptData", "NoHeldOutData"})
"""Evaluated reasons of an evaluation that does not run (the upload follows training at once)."""


@dataclass(frozen=True)
class UploadStep:
    """What to do with the upload Job now."""

    keep: bool = False
    """Observe (and converge the knobs of) the existing Job."""
    delete: bool = False
    """Delete the existing Job (foreground) once the status observing it is written; the next
    reconcile makes the new one."""
    create: bool = False
    """Make the upload Job for the export as it is now."""
    record: UploadKey | None = None
    """What `status.upload` records: the key of the Job Published describes (the stale one while
    it is left to finish), else the key asked for."""
    note: str = ""
    """Why Published is Uploading although no Job of this key runs (replacing, waiting)."""
    retried: str = ""
    """The cause, for an `UploadRetried` Event (empty: none)."""
    cancelled: bool = False
    """A Job not started was deleted because `spec.export` was removed (`UploadCancelled`)."""


def key_of(job: Obj | None, wanted: UploadKey | None) -> UploadKey | None:
    """The key an existing Job was made for; one made before keys were recorded counts as current."""
    annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
    return UploadKey.from_annotations(annotations) or wanted


def recorded(status: Obj, wanted: UploadKey | None) -> UploadKey | None:
    """The key Published describes; a status from before keys were recorded describes the current
    export (no upload is repeated on an operator upgrade)."""
    key = UploadKey.from_status(status.get("upload"))
    if key is None and find(status.get("conditions") or [], "Published") is not None:
        return wanted
    return key


def published_reason(status: Obj) -> str:
    return str((find(status.get("conditions") or [], "Published") or {}).get("reason") or "")


def evaluated_after_run(status: Obj) -> bool | None:
    """For a completed run: True when its evaluation succeeded, False when it was skipped (both
    may upload), None when the draft may not be uploaded (not trained, or its evaluation failed)."""
    conditions = status.get("conditions") or []
    evaluated = find(conditions, "Evaluated") or {}
    if (find(conditions, "Exported") or {}).get("status") != "True":
        return None
    if evaluated.get("status") == "True":
        return True
    return False if evaluated.get("reason") in SKIPPED else None


def settled(status: Obj, key: UploadKey | None) -> bool:
    """The outcome of the upload for `key` is recorded: its Job is not made again, gets its TTL,
    and its pods need not be read again."""
    return recorded(status, key) == key and published_reason(status) in FINAL


def due(status: Obj, wanted: UploadKey | None) -> bool:
    """A completed run still has upload work: the export (or retry request) is not the one whose
    outcome status shows, or an upload is under way."""
    if not is_true(status.get("conditions") or [], "Complete"):
        return False
    return recorded(status, wanted) != wanted or published_reason(status) in IN_FLIGHT


def _cause(old: UploadKey, new: UploadKey, reason: str) -> str:
    """The UploadRetried message: what changed, and how the upload before ended (its Published reason)."""
    what = (
        "spec.export changed"
        if old.export_hash != new.export_hash
        else f"specops.dev/retry-upload is {new.retry!r}"
    )
    outcome = {"Uploaded": "succeeded", "UploadFailed": "failed"}.get(reason, "had not started")
    return f"{what}: uploading again (the previous upload {outcome})"


def _finished(job: Obj) -> bool:
    view = JobView.of(job)
    return view.complete or view.failed


def decide(
    wanted: UploadKey | None,
    ready: bool,
    job: Obj | None,
    running: bool,
    status: Obj,
) -> UploadStep:
    """`wanted`: the key `spec.export` asks for now (None without one); `ready`: an upload may run
    now (trained and evaluated); `job`: the upload Job as it exists; `running`: a pod of it runs;
    `status`: the resource's status (what was recorded).

    A stale Job is observed once more while it is deleted (after the status is written, as a
    failed trainer attempt is), so its outcome (a URL, an error line) is recorded first; the new
    Job is made once the old one is gone, with the Event naming why."""
    before = recorded(status, wanted)
    if job is not None:
        if (job.get("metadata") or {}).get("deletionTimestamp"):
            return UploadStep(record=before, note="replacing the upload Job (the old one is being deleted)")
        have = key_of(job, wanted)
        if have == wanted:
            return UploadStep(keep=True, record=wanted)
        if running:
            note = "spec.export changed: uploads again once the running upload ends" if wanted else ""
            return UploadStep(keep=True, record=have, note=note)
        if wanted is None:
            if _finished(job):
                return UploadStep(keep=True)  # its outcome stands; Published: NotRequested
            return UploadStep(keep=True, delete=True, cancelled=True)
        note = "" if _finished(job) else "replacing the upload Job"
        return UploadStep(keep=True, delete=True, record=have, note=note)
    if wanted is None or not ready:
        return UploadStep(record=wanted)
    if settled(status, wanted):
        return UploadStep(record=wanted)  # its outcome is recorded; the TTL removed the Job
    reason = published_reason(status)
    retried = _cause(before, wanted, reason) if before is not None and before != wanted else ""
    return UploadStep(create=True, record=wanted, retried=retried)
