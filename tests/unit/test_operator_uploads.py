"""The upload Job's next step when `spec.export` may have changed (`specops_operator.uploads`),
and the key an upload Job records (`builders.publish.UploadKey`), case by case."""

from __future__ import annotations

from typing import Any

from specops_operator.api import ExportSpec
from specops_operator.builders.publish import UploadKey
from specops_operator.uploads import decide, due

Obj = dict[str, Any]
OLD = UploadKey("a" * 16)
NEW = UploadKey("b" * 16)


def _job(key: UploadKey | None, *conditions: str, deleting: bool = False) -> Obj:
    meta: Obj = {"name": "t-publish", "uid": "u", "annotations": key.annotations() if key else {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]}}


def _status(key: UploadKey | None, reason: str | None, complete: bool = True) -> Obj:
    conditions = [{"type": "Complete", "status": "True" if complete else "False"}]
    if reason:
        conditions.append({"type": "Published", "status": str(reason == "Uploaded"), "reason": reason})
    return {"conditions": conditions, **({"upload": key.status()} if key else {})}


def test_equal_exports_hash_equal_and_the_retry_value_is_kept_short() -> None:
    written = ExportSpec.model_validate({"hub": {"repo": "acme/d"}})
    defaults = ExportSpec.model_validate({"hub": {"repo": "acme/d", "private": False}})
    assert UploadKey.of(written, {}) == UploadKey.of(defaults, {})
    assert UploadKey.of(written, {}) != UploadKey.of(
        ExportSpec.model_validate({"hub": {"repo": "acme/e"}}), {}
    )
    retry = UploadKey.of(written, {"specops.dev/retry-upload": "x" * 300}).retry
    assert retry.startswith("sha256:") and len(retry) <= 63
    key = UploadKey.of(written, {"specops.dev/retry-upload": "2"})
    assert UploadKey.from_annotations(key.annotations()) == key == UploadKey.from_status(key.status())


def test_a_stale_job_is_observed_then_deleted_a_running_one_is_left_to_finish() -> None:
    failed = decide(NEW, True, _job(OLD, "Failed"), False, _status(OLD, "UploadFailed"))
    assert failed.keep and failed.delete and failed.record == OLD and not failed.create
    pending = decide(NEW, True, _job(OLD), False, _status(OLD, "Uploading", complete=False))
    assert pending.delete and pending.note
    running = decide(NEW, True, _job(OLD), True, _status(OLD, "Uploading", complete=False))
    assert running.keep and not running.delete and running.record == OLD and "ends" in running.note
    dying = decide(NEW, True, _job(OLD, "Failed", deleting=True), False, _status(OLD, "UploadFailed"))
    assert not (dying.keep or dying.create) and dying.record == OLD


def test_the_new_job_is_made_once_with_the_cause_and_never_twice() -> None:
    made = decide(NEW, True, None, False, _status(OLD, "UploadFailed"))
    assert made.create and made.record == NEW and "spec.export changed" in made.retried
    assert "failed" in made.retried
    retry = UploadKey(OLD.export_hash, "2")
    again = decide(retry, True, None, False, _status(OLD, "Uploaded"))
    assert "specops.dev/retry-upload is '2'" in again.retried and "succeeded" in again.retried
    done = decide(NEW, True, None, False, _status(NEW, "Uploaded"))  # the TTL removed its Job
    assert not done.create
    lost = decide(NEW, True, None, False, _status(NEW, "Uploading"))  # deleted before it ended
    assert lost.create and not lost.retried
    assert not decide(NEW, False, None, False, _status(None, None)).create  # not evaluated yet


def test_removing_the_export_cancels_only_a_job_not_started() -> None:
    pending = decide(None, True, _job(OLD), False, _status(OLD, "Uploading", complete=False))
    assert pending.delete and pending.cancelled
    finished = decide(None, True, _job(OLD, "Complete"), False, _status(OLD, "Uploaded"))
    assert finished.keep and not finished.delete and finished.record is None


def test_a_completed_run_has_upload_work_only_when_the_recorded_key_differs() -> None:
    assert not due(_status(NEW, "Uploaded"), NEW)
    assert due(_status(OLD, "UploadFailed"), NEW)
    assert due(_status(NEW, "Uploading"), NEW)
    assert due(_status(None, None), NEW)  # added after the run completed
    assert not due(_status(None, "UploadFailed"), NEW)  # recorded before keys were: no re-upload
    assert not due(_status(None, None), None)
    assert not due(_status(OLD, "UploadFailed", complete=False), NEW)  # a run not complete: the usual path
