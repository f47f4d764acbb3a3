"""Whole-group restarts of the trainer (issue 18 #2): a rank's retryable failure replaces every
trainer pod (the Job is deleted with foreground propagation, the next attempt created with its own
rendezvous id and resume), exits 2/3/4 fail at once, `spec.trainer.maxRestarts` bounds the count,
and the count lives in status, so an operator restart neither forgets nor repeats one."""

from __future__ import annotations

import uuid
from typing import Any

import kmock
import yaml
from test_reconcile import OFFLINE, TR, _condition, _conditions, _settle

from conftest import Api, Runner, example, fake_pod, job_done, job_failed

NAME = "qwen3-8b-hass"
JOB = f"{NAME}-train"
HOLD = "test.specops.dev/hold"
"""A finalizer standing in for the garbage collector's foregroundDeletion: the Job stays
(deletionTimestamp set) until its pods are gone."""
Obj = dict[str, Any]


async def _trainer(
    api: Api, operator: Runner, max_restarts: int | None = None, *, started: bool = False
) -> Obj:
    """A 2-node HASS training on complete data (the operator started); returns its first trainer Job."""
    if not started:
        await operator()
    training = example("hass-train.yaml")
    if max_restarts is not None:
        training["spec"]["trainer"] = {"maxRestarts": max_restarts}
    await api.create(example("datagen-offline.yaml"))
    await api.create(training)
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"), what="generator Job")
    await api.patch("batch/v1", "Job", "ml", f"{OFFLINE}-gen", job_done(8), "status")
    return await api.until(lambda: api.get("batch/v1", "Job", "ml", JOB), what="trainer Job")


def _attempt(job: Obj | None) -> str | None:
    return ((job or {}).get("metadata") or {}).get("annotations", {}).get("specops.dev/attempt")


def _env(job: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


async def _fail_rank(
    api: Api, job: Obj, index: int, exit_code: int, message: str, *, hold: bool = False
) -> None:
    """Rank `index` of this Job fails; with backoffLimit 0 the Job controller fails the Job."""
    pod = fake_pod(NAME, "SpeculatorTraining", "trainer", index, exit_code=exit_code, message=message)
    pod["metadata"]["name"] = f"{JOB}-{index}-{uuid.uuid4().hex[:5]}"
    pod["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": JOB,
            "uid": job["metadata"]["uid"],
            "controller": True,
        }
    ]
    await api.create(pod)
    if hold:
        await api.patch("batch/v1", "Job", "ml", JOB, {"metadata": {"finalizers": [HOLD]}})
    await api.patch(
        "batch/v1",
        "Job",
        "ml",
        JOB,
        job_failed("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        "status",
    )


def _deletes(api: Api) -> list[Any]:
    return [
        r.data
        for r in api.server
        if r.method == kmock.method.DELETE and r.resource is not None and r.resource.plural == "jobs"
    ]


def _trainer_status(api: Api) -> Obj:
    return dict((api.get(*TR, "ml", NAME) or {}).get("status", {}).get("trainer") or {})


async def test_a_killed_rank_restarts_the_whole_group_which_resumes(api: Api, operator: Runner) -> None:
    first = await _trainer(api, operator)
    assert _attempt(first) == "0" and _env(first)["PET_RDZV_ID"].endswith("-0")
    await _fail_rank(api, first, 1, 137, "", hold=True)

    # Status records the restart first; the failed Job goes with its pods (foreground), and no
    # new attempt is created while it is still there.
    await api.until(lambda: _trainer_status(api).get("restarts") == 1, what="restarts 1")
    await api.until(
        lambda: (api.get("batch/v1", "Job", "ml", JOB) or {}).get("metadata", {}).get("deletionTimestamp"),
        what="deletion",
    )
    [options] = _deletes(api)
    assert options["propagationPolicy"] == "Foreground" and options["preconditions"] == {
        "uid": first["metadata"]["uid"]
    }
    await _settle(api)
    held = api.get("batch/v1", "Job", "ml", JOB)
    assert held is not None and held["metadata"]["uid"] == first["metadata"]["uid"], (
        "no attempt beside a dying one"
    )
    ready = _conditions(api.get(*TR, "ml", NAME))["Ready"]
    assert (
        ready["reason"] == "Restarting"
        and "rank 1" in ready["message"]
        and "exit code 137" in ready["message"]
    )

    await api.patch("batch/v1", "Job", "ml", JOB, {"metadata": {"finalizers": None}})  # its pods are gone
    second = await api.until(
        lambda: (
            _attempt(api.get("batch/v1", "Job", "ml", JOB)) == "1" and api.get("batch/v1", "Job", "ml", JOB)
        ),
        what="attempt 1",
    )
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert _env(second)["PET_RDZV_ID"] == _env(first)["PET_RDZV_ID"][:-1] + "1"  # never the stale group's
    config = yaml.safe_load(api.get("v1", "ConfigMap", "ml", JOB)["data"]["config.yaml"])  # type: ignore[index]
    assert config["resume"] == "auto"  # every rank resumes from the newest checkpoint
    failure = _trainer_status(api)["lastFailure"]
    assert failure["pod"].startswith(f"{JOB}-1-") and failure["rank"] == 1 and failure["exitCode"] == 137
    assert failure["attempt"] == 0
    await api.until(_condition(api, TR, NAME, "Failed", "False"), what="not failed")
    await api.until(
        lambda: [e for e in api.children("Event") if e.get("reason") == "TrainerRestarted"], what="event"
    )
    events = [e for e in api.children("Event") if e.get("reason") == "TrainerRestarted"]
    assert len(events) == 1 and events[0]["type"] == "Warning"
    assert failure["pod"] in events[0]["message"] and "exit code 137" in events[0]["message"]

    # The second attempt completes: the training goes on as if nothing happened.
    await api.patch("batch/v1", "Job", "ml", JOB, job_done(2), "status")
    await api.until(_condition(api, TR, NAME, "Exported"), what="Exported")
    assert _trainer_status(api)["restarts"] == 1


async def test_a_config_error_fails_at_once_without_a_restart(api: Api, operator: Runner) -> None:
    first = await _trainer(api, operator)
    line = "specops train: error: verifier.name_or_path: no such revision"
    await _fail_rank(api, first, 0, 2, f"loading\n{line}\n")
    await api.until(_condition(api, TR, NAME, "Failed"), what="Failed")
    failed = _conditions(api.get(*TR, "ml", NAME))["Failed"]
    assert failed["reason"] == "ConfigError" and line in failed["message"]
    await _settle(api)
    assert (
        _deletes(api) == []
        and api.get("batch/v1", "Job", "ml", JOB)["metadata"]["uid"] == first["metadata"]["uid"]
    )  # type: ignore[index]
    assert _trainer_status(api)["restarts"] == 0 and _trainer_status(api)["lastFailure"]["exitCode"] == 2


async def test_restarts_are_bounded_and_the_failure_names_the_last_cause(api: Api, operator: Runner) -> None:
    job = await _trainer(api, operator, max_restarts=1)
    await _fail_rank(api, job, 1, 137, "")
    job = await api.until(
        lambda: (
            _attempt(api.get("batch/v1", "Job", "ml", JOB)) == "1" and api.get("batch/v1", "Job", "ml", JOB)
        ),
        what="attempt 1",
    )
    oom = "RuntimeError: error: CUDA out of memory"
    await _fail_rank(api, job, 0, 1, f"step 40\n{oom}\n")
    await api.until(_condition(api, TR, NAME, "Failed"), what="Failed")
    failed = _conditions(api.get(*TR, "ml", NAME))["Failed"]
    assert failed["reason"] == "RestartsExhausted"
    assert "1 of 1 restarts (spec.trainer.maxRestarts)" in failed["message"]
    assert "rank 0" in failed["message"] and "exit code 1" in failed["message"] and oom in failed["message"]
    await _settle(api)
    assert len(_deletes(api)) == 1 and _attempt(api.get("batch/v1", "Job", "ml", JOB)) == "1"
    assert _trainer_status(api)["restarts"] == 1


async def test_the_restart_count_survives_an_operator_restart(api: Api, operator: Runner) -> None:
    running = await operator()
    first = await _trainer(api, operator, max_restarts=2, started=True)
    await _fail_rank(api, first, 1, 137, "")
    second = await api.until(
        lambda: (
            _attempt(api.get("batch/v1", "Job", "ml", JOB)) == "1" and api.get("batch/v1", "Job", "ml", JOB)
        ),
        what="attempt 1",
    )
    # A new operator process (the old one's memory gone) neither forgets nor repeats the restart.
    await running.stop()
    await operator()
    await _settle(api)
    assert api.get("batch/v1", "Job", "ml", JOB)["metadata"]["uid"] == second["metadata"]["uid"]  # type: ignore[index]
    assert _trainer_status(api)["restarts"] == 1 and len(_deletes(api)) == 1
    await _fail_rank(api, second, 0, 143, "")
    third = await api.until(
        lambda: (
            _attempt(api.get("batch/v1", "Job", "ml", JOB)) == "2" and api.get("batch/v1", "Job", "ml", JOB)
        ),
        what="attempt 2",
    )
    assert _trainer_status(api)["restarts"] == 2 and _env(third)["PET_RDZV_ID"].endswith("-2")


async def test_under_kueue_each_attempt_waits_for_admission_and_suspend_reaches_its_workload(
    api: Api, operator: Runner
) -> None:
    api.server.resources["kueue.x-k8s.io/v1beta1/workloads"] = kmock.ResourceInfo(
        kind="Workload", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
    )
    await operator()
    training = example("hass-train.yaml")
    training["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "specops"}
    await api.create(example("datagen-offline.yaml"))
    await api.create(training)
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"), what="generator Job")
    await api.patch("batch/v1", "Job", "ml", f"{OFFLINE}-gen", job_done(8), "status")
    first = await api.until(lambda: api.get("batch/v1", "Job", "ml", JOB), what="trainer Job")
    assert first["spec"]["suspend"] is True
    await api.patch("batch/v1", "Job", "ml", JOB, {"spec": {"suspend": False}})  # Kueue admits it
    await _fail_rank(api, first, 1, 137, "")
    second = await api.until(
        lambda: (
            _attempt(api.get("batch/v1", "Job", "ml", JOB)) == "1" and api.get("batch/v1", "Job", "ml", JOB)
        ),
        what="attempt 1",
    )
    # A new Job, so a new Kueue Workload: queued and suspended until Kueue admits it again.
    assert second["spec"]["suspend"] is True
    assert second["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "specops"
    workload = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{JOB}-1",
            "namespace": "ml",
            "labels": {"kueue.x-k8s.io/job-uid": second["metadata"]["uid"]},
        },
        "spec": {"active": True, "queueName": "specops"},
    }
    await api.create(workload)
    await api.patch("batch/v1", "Job", "ml", JOB, {"spec": {"suspend": False}})  # admitted
    await api.patch(*TR, "ml", NAME, {"spec": {"suspend": True}})
    stored = lambda: api.get("kueue.x-k8s.io/v1beta1", "Workload", "ml", f"job-{JOB}-1") or {}  # noqa: E731
    await api.until(lambda: stored()["spec"]["active"] is False, what="the attempt's Workload deactivated")
    await _settle(api)
    job = api.get("batch/v1", "Job", "ml", JOB)
    assert job is not None and job["spec"]["suspend"] is False, "Kueue alone flips a queued Job's suspend"
    assert _trainer_status(api)["restarts"] == 1
