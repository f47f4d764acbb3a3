"""`spec.export` changes after the upload Job exists (kmock): a failed or not-started upload is
replaced by one for the export as it is now (the stale Job deleted with foreground propagation),
a running one is left to finish first, an export added after the run completed uploads, a
removed one cancels an upload that has not started, and `specops.dev/retry-upload` retries with
the same export."""

from __future__ import annotations

from typing import Any

import kmock
from test_export import NAME, TR, _conditions, _container, _env, _finish, _job, _trained
from test_reconcile import _settle

from conftest import Api, Runner, fake_pod

Obj = dict[str, Any]
PUBLISH = f"{NAME}-publish"
HUB = {"repo": "acme/llama31-eagle3-typo", "tokenSecret": {"name": "hf-write", "key": "token"}}
URL = "https://huggingface.co/acme/llama31-eagle3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _push(job: Obj | None) -> list[str]:
    command = _container(job or {})["command"]
    return list(command[command.index("specops") :])


def _uid(job: Obj | None) -> str:
    return str(((job or {}).get("metadata") or {}).get("uid") or "")


def _deletes(api: Api) -> list[tuple[str, Any]]:
    return [
        (str(r.name), r.data)
        for r in api.server
        if r.method == kmock.method.DELETE and r.resource is not None and r.resource.plural == "jobs"
    ]


def _events(api: Api, reason: str) -> list[Obj]:
    return [e for e in api.children("Event") if e.get("reason") == reason]


def _published(api: Api) -> Obj:
    return _conditions(api).get("Published") or {}


async def _failed_upload(api: Api) -> Obj:
    """A trained draft (evaluation off) whose upload to a mistyped repository failed."""
    await _trained(api, {"hub": HUB}, {"enabled": False})
    first = await api.until(lambda: _job(api, "publish"), what="upload Job")
    error = "specops push: error: --repo acme/llama31-eagle3-typo: 403 Forbidden: the token cannot write here"
    await _finish(api, "publisher", "publish", {"error": error}, exit_code=2)
    await api.until(lambda: _published(api).get("reason") == "UploadFailed", what="UploadFailed")
    assert _conditions(api)["Complete"]["status"] == "True"
    return first


async def _replaced(api: Api, first: Obj) -> Obj:
    """The new upload Job; the old one's pods are deleted, as the foreground deletion of a real
    garbage collector had done before the old Job went (kmock has none)."""
    job = await api.until(
        lambda: (job := _job(api, "publish")) is not None and _uid(job) != _uid(first) and job,
        what="a new upload Job",
    )
    for pod in api.children("Pod"):
        await api.delete("v1", "Pod", "ml", pod["metadata"]["name"])
    return job


async def test_a_failed_upload_is_retried_after_the_export_is_fixed(api: Api, operator: Runner) -> None:
    await operator()
    first = await _failed_upload(api)
    await api.patch(*TR, "ml", NAME, {"spec": {"export": {"hub": {"repo": "acme/llama31-eagle3"}}}})

    second = await _replaced(api, first)
    assert _push(second) == [
        *("specops", "push", "/output/final", "--repo", "acme/llama31-eagle3"),
        *("--allowed-root", "/output"),
    ]
    [(name, options)] = _deletes(api)
    assert name == PUBLISH and options["propagationPolicy"] == "Foreground"
    assert options["preconditions"] == {"uid": _uid(first)}
    await api.until(lambda: _published(api).get("reason") == "Uploading", what="Published Uploading")
    [event] = await api.until(lambda: _events(api, "UploadRetried"), what="UploadRetried")
    assert "spec.export changed" in event["message"] and "failed" in event["message"]

    # The fixed upload succeeds: Published, with the new URL and commit.
    await _finish(api, "publisher", "publish", {"url": URL, "commit": COMMIT})
    await api.until(lambda: _published(api).get("reason") == "Uploaded", what="Uploaded")
    status = (api.get(*TR, "ml", NAME) or {})["status"]
    assert status["artifact"]["url"] == URL and status["artifact"]["revision"] == COMMIT
    assert _conditions(api)["Complete"]["status"] == "True"
    assert "uploaded to acme/llama31-eagle3" in _conditions(api)["Ready"]["message"]
    await _settle(api)
    assert _uid(_job(api, "publish")) == _uid(second) and len(_deletes(api)) == 1, "uploaded once"
    assert _job(api, "train") is not None and len(_events(api, "UploadRetried")) == 1


async def test_an_upload_waiting_on_a_missing_secret_is_replaced_when_the_secret_name_is_fixed(
    api: Api, operator: Runner
) -> None:
    await operator()
    await _trained(api, {"hub": HUB}, {"enabled": False})
    first = await api.until(lambda: _job(api, "publish"), what="upload Job")
    stuck = fake_pod(NAME, "SpeculatorTraining", "publisher", 0, exit_code=0, message="")
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "hf-write" not found'}
    stuck["status"] = {
        "phase": "Pending",
        "containerStatuses": [{"name": "workload", "ready": False, "state": {"waiting": waiting}}],
    }
    await api.create(stuck)
    await api.patch("batch/v1", "Job", "ml", PUBLISH, {"status": {"active": 1, "ready": 0}}, "status")
    await api.until(lambda: _conditions(api)["Ready"].get("reason") == "PodsNotStarting", what="stuck")

    fixed = {"hub": {"tokenSecret": {"name": "huggingface-write"}}}
    await api.patch(*TR, "ml", NAME, {"spec": {"export": fixed}})
    second = await _replaced(api, first)
    assert _env(second)["HF_TOKEN"]["secretKeyRef"]["name"] == "huggingface-write"
    [event] = await api.until(lambda: _events(api, "UploadRetried"), what="UploadRetried")
    assert "spec.export changed" in event["message"] and "had not started" in event["message"]


async def test_a_retry_annotation_uploads_the_same_export_again(api: Api, operator: Runner) -> None:
    await operator()
    first = await _failed_upload(api)
    await _settle(api)
    assert _uid(_job(api, "publish")) == _uid(first), "a failed upload is not retried by itself"
    await api.patch(*TR, "ml", NAME, {"metadata": {"annotations": {"specops.dev/retry-upload": "1"}}})
    second = await _replaced(api, first)
    assert _push(second) == _push(first)
    [event] = await api.until(lambda: _events(api, "UploadRetried"), what="UploadRetried")
    assert "specops.dev/retry-upload is '1'" in event["message"]
    await _finish(api, "publisher", "publish", {"url": URL, "commit": COMMIT})
    await api.until(lambda: _published(api).get("reason") == "Uploaded", what="Uploaded")
    assert (api.get(*TR, "ml", NAME) or {})["status"]["upload"]["retry"] == "1"


async def test_an_export_edited_while_its_upload_runs_waits_for_it(api: Api, operator: Runner) -> None:
    await operator()
    await _trained(api, {"hub": {"repo": "acme/first"}}, {"enabled": False})
    first = await api.until(lambda: _job(api, "publish"), what="upload Job")
    running = fake_pod(NAME, "SpeculatorTraining", "publisher", 0, exit_code=0, message="")
    running["status"] = {"phase": "Running", "containerStatuses": [{"name": "workload", "ready": True}]}
    await api.create(running)
    await api.patch("batch/v1", "Job", "ml", PUBLISH, {"status": {"active": 1, "ready": 1}}, "status")
    await api.until(lambda: _published(api).get("reason") == "Uploading", what="Uploading")

    await api.patch(*TR, "ml", NAME, {"spec": {"export": {"hub": {"repo": "acme/second"}}}})
    await api.until(lambda: "once the running upload ends" in _published(api).get("message", ""), what="note")
    await _settle(api)
    assert _uid(_job(api, "publish")) == _uid(first) and _deletes(api) == [], "a running upload was cut"

    # It ends (here: succeeds, for the old repository): the new export is uploaded next.
    await api.delete("v1", "Pod", "ml", running["metadata"]["name"])
    await _finish(api, "publisher", "publish", {"url": "https://huggingface.co/acme/first", "commit": COMMIT})
    second = await _replaced(api, first)
    assert "acme/second" in _push(second)
    [event] = await api.until(lambda: _events(api, "UploadRetried"), what="UploadRetried")
    assert "succeeded" in event["message"]
    status = (api.get(*TR, "ml", NAME) or {})["status"]
    assert status["artifact"]["url"] == "https://huggingface.co/acme/first", "the latest successful upload"
    await _finish(
        api, "publisher", "publish", {"url": "https://huggingface.co/acme/second", "commit": COMMIT}
    )
    await api.until(
        lambda: (
            (api.get(*TR, "ml", NAME) or {})["status"]["artifact"].get("url")
            == "https://huggingface.co/acme/second"
        ),
        what="the new URL",
    )
    assert _published(api)["reason"] == "Uploaded"


async def test_an_export_added_after_the_run_completed_uploads(api: Api, operator: Runner) -> None:
    await operator()
    await _trained(api, None, {"enabled": False})
    await api.until(lambda: _conditions(api).get("Complete", {}).get("status") == "True", what="Complete")
    assert "Published" not in _conditions(api)

    await api.patch(*TR, "ml", NAME, {"spec": {"export": {"hub": {"repo": "acme/late"}}}})
    job = await api.until(lambda: _job(api, "publish"), what="upload Job after completion")
    assert "acme/late" in _push(job) and "--eval-report" not in _push(job)
    assert "ttlSecondsAfterFinished" not in job["spec"], "its outcome is not recorded yet"
    await api.until(lambda: _published(api).get("reason") == "Uploading", what="Uploading")
    assert _events(api, "UploadRetried") == []
    await _finish(api, "publisher", "publish", {"url": "https://huggingface.co/acme/late", "commit": COMMIT})
    await api.until(lambda: _published(api).get("reason") == "Uploaded", what="Uploaded")
    assert (api.get(*TR, "ml", NAME) or {})["status"]["artifact"]["url"] == "https://huggingface.co/acme/late"


async def test_removing_the_export_cancels_an_upload_not_started(api: Api, operator: Runner) -> None:
    await operator()
    await _trained(api, {"hub": HUB}, {"enabled": False})
    first = await api.until(lambda: _job(api, "publish"), what="upload Job")
    await api.patch(*TR, "ml", NAME, {"spec": {"export": None}})
    await api.until(lambda: _job(api, "publish") is None, what="the upload Job deleted")
    [(name, options)] = _deletes(api)
    assert name == PUBLISH and options["preconditions"] == {"uid": _uid(first)}
    await api.until(lambda: _events(api, "UploadCancelled"), what="UploadCancelled")
    await api.until(lambda: _conditions(api).get("Complete", {}).get("status") == "True", what="Complete")
    assert _published(api)["status"] == "False" and _published(api)["reason"] == "NotRequested"
    await _settle(api)
    assert _job(api, "publish") is None
