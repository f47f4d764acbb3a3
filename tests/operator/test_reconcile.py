"""The operator against an in-memory API server (kmock): children, idempotency, suspend,
API faults, deletion and status that follows the Jobs."""

from __future__ import annotations

import json
from typing import Any

import kmock
import pytest

from conftest import Api, Runner, example, fake_pod, job_done, job_failed

DG = ("specops.dev/v1alpha1", "SpeculatorDataGen")
TR = ("specops.dev/v1alpha1", "SpeculatorTraining")
OFFLINE = "qwen3-8b-sharegpt"


def _conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _condition(api: Api, kind: tuple[str, str], name: str, type_: str, status: str = "True") -> Any:
    return lambda: _conditions(api.get(*kind, "ml", name)).get(type_, {}).get("status") == status


def _posts(api: Api, plural: str) -> int:
    return sum(
        1
        for request in api.server
        if request.method == kmock.method.POST
        and request.resource is not None
        and request.resource.plural == plural
    )


def _uids(api: Api) -> dict[str, str]:
    """Every child's uid by kind/name: unchanged means nothing was deleted and created again."""
    kinds = ("Job", "ConfigMap", "PersistentVolumeClaim", "Service", "SpeculatorDataGen")
    return {f"{k}/{o['metadata']['name']}": o["metadata"]["uid"] for k in kinds for o in api.children(k)}


async def _settle(api: Api, cycles: int = 3, interval: float = 0.3) -> None:
    """Let a few refresh timers run."""
    import asyncio

    await asyncio.sleep(cycles * interval)


async def test_create_makes_each_child_once_with_owner_references(api: Api, operator: Runner) -> None:
    await operator()
    cr = await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"), what="generator Job")
    await _settle(api)
    uid = cr["metadata"]["uid"]
    job = api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen")
    config = api.get("v1", "ConfigMap", "ml", f"{OFFLINE}-gen")
    claim = api.get("v1", "PersistentVolumeClaim", "ml", f"{OFFLINE}-data")
    assert job and config and claim
    for child in (job, config):
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [uid]
    assert "ownerReferences" not in claim["metadata"]  # retained: outlives the CR
    assert [len(api.children(k)) for k in ("Job", "ConfigMap", "PersistentVolumeClaim")] == [1, 1, 1]
    assert _posts(api, "jobs") >= 1
    assert job["spec"]["completions"] == 8 and job["spec"]["parallelism"] == 2
    conditions = _conditions(api.get(*DG, "ml", OFFLINE))
    assert conditions["VerifierCompatible"]["status"] == "True"
    assert conditions["Reconciling"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "Starting"
    obj = api.get(*DG, "ml", OFFLINE)
    assert obj is not None and "specops.dev/finalizer" in obj["metadata"]["finalizers"]
    assert any(k.startswith("specops.dev/") for k in obj["metadata"]["annotations"])


async def test_replayed_create_event_makes_no_duplicates(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"), what="generator Job")
    await _settle(api, 1)
    # Forget that the create was handled: kopf sees a new object and replays the create handler.
    annotations = (api.get(*DG, "ml", OFFLINE) or {})["metadata"]["annotations"]
    before = _uids(api)
    await api.patch(*DG, "ml", OFFLINE, {"metadata": {"annotations": dict.fromkeys(annotations)}})
    handled = "specops.dev/last-handled-configuration"
    await api.until(lambda: handled in (api.get(*DG, "ml", OFFLINE) or {})["metadata"].get("annotations", {}))
    await _settle(api)
    assert _uids(api) == before, "a replayed create re-created children"
    assert _conditions(api.get(*DG, "ml", OFFLINE))["Stalled"]["status"] == "False"


async def test_operator_restart_resumes_without_duplicates(api: Api, operator: Runner) -> None:
    first = await operator()
    await api.create(example("eagle3-train.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", "llama31-8b-eagle3-data-gen"), what="child Job")
    await _settle(api, 1)
    before = _uids(api)
    await first.stop()
    second = await operator()
    await _settle(api)
    assert second.ctx.reconciles > 0
    assert _uids(api) == before, "the restarted operator re-created children"
    assert len(api.children("SpeculatorDataGen")) == 1 and len(api.children("Job")) == 1


async def test_suspend_and_resume_propagate_to_the_job(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    job = lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen") or {}  # noqa: E731
    await api.until(lambda: job().get("spec", {}).get("suspend") is False, what="running Job")
    await api.patch(*DG, "ml", OFFLINE, {"spec": {"suspend": True}})
    await api.until(lambda: job()["spec"]["suspend"] is True, what="suspended Job")
    await api.until(_condition(api, DG, OFFLINE, "Suspended"), what="Suspended=True")
    assert _conditions(api.get(*DG, "ml", OFFLINE))["Reconciling"]["status"] == "False"
    await api.until(lambda: any(e.get("reason") == "Suspended" for e in api.children("Event")), what="event")
    await api.patch(*DG, "ml", OFFLINE, {"spec": {"suspend": False}})
    await api.until(lambda: job()["spec"]["suspend"] is False, what="resumed Job")
    await api.until(_condition(api, DG, OFFLINE, "Suspended", "False"), what="Suspended=False")


async def test_kueue_jobs_start_suspended_and_kueue_resumes_them(api: Api, operator: Runner) -> None:
    await operator()
    cr = example("datagen-offline.yaml")
    cr["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus"}
    await api.create(cr)
    job = lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen") or {}  # noqa: E731
    await api.until(lambda: job().get("spec", {}).get("suspend") is True, what="suspended Job")
    assert job()["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    await api.until(
        lambda: (
            _conditions(api.get(*DG, "ml", OFFLINE)).get("Ready", {}).get("reason") == "WaitingForAdmission"
        )
    )
    await api.patch("batch/v1", "Job", "ml", f"{OFFLINE}-gen", {"spec": {"suspend": False}})  # Kueue admits
    await api.patch(
        "batch/v1", "Job", "ml", f"{OFFLINE}-gen", {"status": {"active": 2, "ready": 2}}, "status"
    )
    await api.until(_condition(api, DG, OFFLINE, "Running"), what="Running=True")
    await _settle(api)
    assert job()["spec"]["suspend"] is False, "the operator re-suspended an admitted Job"


async def test_scaling_workers_changes_job_parallelism(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    job = lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen") or {}  # noqa: E731
    await api.until(lambda: job().get("spec", {}).get("parallelism") == 2)
    await api.patch(*DG, "ml", OFFLINE, {"spec": {"workers": 8}})
    await api.until(lambda: job()["spec"]["parallelism"] == 8, what="parallelism 8")


def _once(method: kmock.method, plural: str, seen: list[Any]) -> Any:
    """A kmock filter matching only the first such request (recorded in `seen`)."""

    def match(request: kmock.Request) -> bool:
        if (
            request.method == method
            and request.resource is not None
            and request.resource.plural == plural
            and not seen
        ):
            seen.append(request)
            return True
        return False

    return match


async def test_lost_create_response_409_is_success(api: Api, operator: Runner) -> None:
    injected: list[Any] = []
    api.server[_once(kmock.method.POST, "jobs", injected)] << 409  # stored, but the answer says AlreadyExists
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(
        lambda: _conditions(api.get(*DG, "ml", OFFLINE)).get("Ready", {}).get("reason") == "Starting"
    )
    assert injected and len(api.children("Job")) == 1
    assert _conditions(api.get(*DG, "ml", OFFLINE))["Stalled"]["status"] == "False"


async def test_server_error_500_is_retried(api: Api, operator: Runner) -> None:
    injected: list[Any] = []
    api.server[_once(kmock.method.POST, "configmaps", injected)] << 500
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"), what="Job after the retry")
    await _settle(api)
    assert injected and len(api.children("ConfigMap")) == 1 and len(api.children("Job")) == 1


async def test_foreign_object_with_our_name_is_never_taken_over(api: Api, operator: Runner) -> None:
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{OFFLINE}-gen", "namespace": "ml"},
            "data": {},
        }
    )
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(_condition(api, DG, OFFLINE, "Stalled"), what="Stalled")
    ready = _conditions(api.get(*DG, "ml", OFFLINE))["Ready"]
    assert ready["reason"] == "ChildConflict" and f"{OFFLINE}-gen" in ready["message"]
    assert api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen") is None
    assert api.get("v1", "ConfigMap", "ml", f"{OFFLINE}-gen")["data"] == {}  # type: ignore[index]


async def test_delete_removes_owned_children_and_keeps_retained_data(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"))
    await api.delete(*DG, "ml", OFFLINE)
    await api.until(lambda: api.get(*DG, "ml", OFFLINE) is None, what="CR released by the finalizer")
    assert api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen") is None
    assert api.get("v1", "ConfigMap", "ml", f"{OFFLINE}-gen") is None
    assert api.get("v1", "PersistentVolumeClaim", "ml", f"{OFFLINE}-data") is not None


async def test_status_follows_the_job_to_completion(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    job_name = f"{OFFLINE}-gen"
    await api.until(lambda: api.get("batch/v1", "Job", "ml", job_name))
    await api.patch(
        "batch/v1", "Job", "ml", job_name, {"status": {"active": 2, "ready": 2, "succeeded": 3}}, "status"
    )
    await api.until(_condition(api, DG, OFFLINE, "Running"), what="Running")
    assert api.get(*DG, "ml", OFFLINE)["status"]["progress"]["shards"] == "3/8"  # type: ignore[index]
    for index in range(8):
        report = {"written": 100, "skipped": 0, "tokens": 50_000, "seconds": 10.0}
        await api.create(
            fake_pod(
                OFFLINE, "SpeculatorDataGen", "generator", index, exit_code=0, message=json.dumps(report)
            )
        )
    await api.patch("batch/v1", "Job", "ml", job_name, job_done(8), "status")
    await api.until(_condition(api, DG, OFFLINE, "Complete"), what="Complete")
    status = api.get(*DG, "ml", OFFLINE)["status"]  # type: ignore[index]
    conditions = _conditions({"status": status})
    assert conditions["ShardsComplete"]["status"] == "True"
    assert conditions["Ready"]["status"] == "True" and conditions["Reconciling"]["status"] == "False"
    assert status["progress"]["examples"] == 800 and status["progress"]["tokensPerSecond"] == 5000.0
    assert status["observedGeneration"] == 1


async def test_config_error_fails_fast_with_the_workload_message(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    job_name = f"{OFFLINE}-gen"
    await api.until(lambda: api.get("batch/v1", "Job", "ml", job_name))
    line = "specops generate-data: error: datasets[0].path: no such dataset"
    await api.create(
        fake_pod(OFFLINE, "SpeculatorDataGen", "generator", 0, exit_code=2, message=f"loading\n{line}\n")
    )
    await api.patch(
        "batch/v1",
        "Job",
        "ml",
        job_name,
        job_failed("PodFailurePolicy", "Container workload exited 2"),
        "status",
    )
    await api.until(_condition(api, DG, OFFLINE, "Failed"), what="Failed")
    conditions = _conditions(api.get(*DG, "ml", OFFLINE))
    assert conditions["Ready"]["reason"] == "ConfigError"
    assert line in conditions["Failed"]["message"]
    assert conditions["Stalled"]["status"] == "True"
    warned = lambda: any(  # noqa: E731 - Events are posted in the background
        e.get("type") == "Warning" and e.get("reason") == "ConfigError" for e in api.children("Event")
    )
    await api.until(warned, what="a ConfigError Warning event")


async def test_invalid_spec_stalls_before_any_child(api: Api, operator: Runner) -> None:
    await operator()
    cr = example("datagen-offline.yaml")
    cr["spec"]["states"] = {"hiddenStates": {"layers": [2, 18, 33, 40]}}  # Qwen3-8B has 36 layers
    await api.create(cr)
    await api.until(_condition(api, DG, OFFLINE, "Stalled"), what="Stalled")
    compatible = _conditions(api.get(*DG, "ml", OFFLINE))["VerifierCompatible"]
    assert compatible["status"] == "False" and compatible["reason"] == "LayerOutOfRange"
    assert "[40]" in compatible["message"]
    await _settle(api)
    assert api.children("Job") == [] and api.children("ConfigMap") == []


async def test_changing_an_immutable_field_stalls_and_leaves_children(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"))
    await api.patch(*DG, "ml", OFFLINE, {"spec": {"shards": 4}})
    await api.until(_condition(api, DG, OFFLINE, "Stalled"), what="Stalled")
    await _settle(api)  # refreshes keep it stalled: the check is against the applied spec, not the last event
    ready = _conditions(api.get(*DG, "ml", OFFLINE))["Ready"]
    assert ready["reason"] == "ImmutableFieldChanged" and "shards is immutable" in ready["message"]
    assert api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen")["spec"]["completions"] == 8  # type: ignore[index]
    await api.patch(*DG, "ml", OFFLINE, {"spec": {"shards": 8}})  # put it back
    await api.until(_condition(api, DG, OFFLINE, "Stalled", "False"), what="no longer stalled")


async def test_training_waits_for_data_then_trains_evaluates_and_exports(api: Api, operator: Runner) -> None:
    running = await operator()
    name = "llama31-8b-eagle3"
    await api.create(example("eagle3-train.yaml"))
    datagen = f"{name}-data"
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{datagen}-gen"), what="child generator Job")
    assert api.get(*DG, "ml", datagen)["metadata"]["ownerReferences"][0]["kind"] == "SpeculatorTraining"  # type: ignore[index]
    assert api.get("v1", "Service", "ml", f"{name}-train") is not None
    await _settle(api)
    assert api.get("batch/v1", "Job", "ml", f"{name}-train") is None, "trained before the data was complete"
    assert _conditions(api.get(*TR, "ml", name))["Ready"]["reason"] == "WaitingForData"

    await api.patch("batch/v1", "Job", "ml", f"{datagen}-gen", job_done(16), "status")
    trainer = await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{name}-train"), what="trainer Job")
    assert trainer["spec"]["completions"] == 1 and trainer["spec"]["suspend"] is False

    report = {"step": 12000, "interrupted": False, "final": "/output/final", "best_val_loss": 1.25}
    await api.create(
        fake_pod(name, "SpeculatorTraining", "trainer", 0, exit_code=0, message=json.dumps(report))
    )
    await api.patch("batch/v1", "Job", "ml", f"{name}-train", job_done(1), "status")
    await api.until(_condition(api, TR, name, "Exported"), what="Exported")
    status = api.get(*TR, "ml", name)["status"]  # type: ignore[index]
    assert status["progress"]["step"] == 12000 and status["progress"]["bestValLoss"] == 1.25
    assert status["artifact"]["vllmServeCommand"].startswith("vllm serve meta-llama/Llama-3.1-8B-Instruct")
    assert api.get("batch/v1", "Job", "ml", f"{name}-eval") is not None
    assert status["conditions"] and _conditions({"status": status})["Complete"]["status"] == "False"

    result = {"acceptance_length": 3.2, "per_position": [0.8, 0.6, 0.4], "lossless": True, "prompts": 80}
    await api.create(
        fake_pod(name, "SpeculatorTraining", "evaluator", 0, exit_code=0, message=json.dumps(result))
    )
    await api.patch("batch/v1", "Job", "ml", f"{name}-eval", job_done(1), "status")
    await api.until(_condition(api, TR, name, "Complete"), what="Complete")
    status = api.get(*TR, "ml", name)["status"]  # type: ignore[index]
    assert status["evaluation"]["acceptanceLength"] == 3.2
    assert _conditions({"status": status})["Evaluated"]["status"] == "True"
    assert running.ctx.reconciles > 0


@pytest.mark.parametrize(
    ("exit_code", "reason"), [(4, "NotLossless"), (1, "EvaluationFailed")], ids=["verdict", "crash"]
)
async def test_failed_evaluation_keeps_the_artifact_and_says_why(
    api: Api, operator: Runner, exit_code: int, reason: str
) -> None:
    """A trained draft is not lost to its evaluation: Complete with the artifact, Evaluated=False."""
    await operator()
    name = "llama31-8b-eagle3"
    await api.create(example("eagle3-train.yaml"))
    datagen = f"{name}-data"
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{datagen}-gen"), what="child generator Job")
    await api.patch("batch/v1", "Job", "ml", f"{datagen}-gen", job_done(16), "status")
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{name}-train"), what="trainer Job")
    report = {"step": 100, "interrupted": False, "final": "/output/final"}
    await api.create(
        fake_pod(name, "SpeculatorTraining", "trainer", 0, exit_code=0, message=json.dumps(report))
    )
    await api.patch("batch/v1", "Job", "ml", f"{name}-train", job_done(1), "status")
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{name}-eval"), what="evaluation Job")

    error = "specops evaluate: error: speculative output differs from greedy decoding for 50% of the prompts"
    result = {"acceptance_length": 2.5, "per_position": [0.7], "lossless": False, "mismatch_rate": 0.5}
    printed = json.dumps({**result, "error": error}) if exit_code == 4 else json.dumps({"error": "boom"})
    await api.create(
        fake_pod(name, "SpeculatorTraining", "evaluator", 0, exit_code=exit_code, message=printed)
    )
    await api.patch(
        "batch/v1", "Job", "ml", f"{name}-eval", job_failed("PodFailurePolicy", "container exited"), "status"
    )
    await api.until(_condition(api, TR, name, "Evaluated", "False"), what="Evaluated=False")
    await api.until(
        lambda: _conditions(api.get(*TR, "ml", name))["Evaluated"]["reason"] == reason, what=reason
    )
    status = api.get(*TR, "ml", name)["status"]  # type: ignore[index]
    conditions = _conditions({"status": status})
    assert conditions["Failed"]["status"] == "False" and conditions["Complete"]["status"] == "True"
    assert conditions["Exported"]["status"] == "True"
    assert status["artifact"]["path"] == "/output/final"
    assert "evaluation failed" in conditions["Ready"]["message"]
    if exit_code == 4:
        assert "50% of the prompts" in conditions["Evaluated"]["message"]
        assert status["evaluation"]["mismatchRate"] == 0.5 and status["evaluation"]["lossless"] is False
    else:
        assert "boom" in conditions["Evaluated"]["message"]


async def test_missing_data_generator_waits_then_proceeds(api: Api, operator: Runner) -> None:
    await operator()
    await api.create(example("hass-train.yaml"))
    await api.until(
        lambda: (
            _conditions(api.get(*TR, "ml", "qwen3-8b-hass")).get("Ready", {}).get("reason")
            == "WaitingForData"
        )
    )
    assert api.children("ConfigMap") == []
    await api.create(example("datagen-offline.yaml"))
    await api.until(lambda: api.get("v1", "ConfigMap", "ml", "qwen3-8b-hass-train"), what="training config")
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{OFFLINE}-gen"), what="generator Job")
    await api.patch("batch/v1", "Job", "ml", f"{OFFLINE}-gen", job_done(8), "status")
    job = await api.until(lambda: api.get("batch/v1", "Job", "ml", "qwen3-8b-hass-train"), what="trainer Job")
    assert job["spec"]["completions"] == 2
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": f"{OFFLINE}-data", "readOnly": True}


async def test_too_small_storage_stalls_with_the_estimate_before_any_child(
    api: Api, operator: Runner
) -> None:
    await operator()
    cr = example("datagen-offline.yaml")
    cr["spec"]["storage"]["size"] = "500Gi"  # 50,000 conversations of Qwen3-8B states need ~1.5Ti
    await api.create(cr)
    await api.until(_condition(api, DG, OFFLINE, "Stalled"), what="Stalled")
    compatible = _conditions(api.get(*DG, "ml", OFFLINE))["VerifierCompatible"]
    assert compatible["status"] == "False" and compatible["reason"] == "StorageTooSmall"
    assert "spec.storage.size 500Gi" in compatible["message"] and "= 1.5Ti" in compatible["message"]
    await _settle(api)
    assert api.children("Job") == [] and api.children("PersistentVolumeClaim") == []


async def test_draft_init_from_reaches_the_trainer_config_and_a_path_off_the_volumes_stalls(
    api: Api, operator: Runner
) -> None:
    import yaml

    from specops.config import TrainConfig, load_config

    await operator()
    cr = example("hass-train.yaml")
    cr["spec"]["draft"]["initFrom"] = "acme/qwen3-8b-eagle3"
    await api.create(example("datagen-offline.yaml"))
    await api.create(cr)
    config = await api.until(
        lambda: api.get("v1", "ConfigMap", "ml", "qwen3-8b-hass-train"), what="training config"
    )
    rendered = load_config(TrainConfig, yaml.safe_load(config["data"]["config.yaml"]))
    assert rendered.draft.init_from == "acme/qwen3-8b-eagle3" and rendered.draft.algorithm == "hass"

    local = example("hass-train.yaml")
    local["metadata"]["name"] = "from-home"
    local["spec"]["draft"]["initFrom"] = "/home/me/drafts/v1"  # not on any volume of the trainer pods
    await api.create(local)
    await api.until(_condition(api, TR, "from-home", "Stalled"), what="Stalled")
    compatible = _conditions(api.get(*TR, "ml", "from-home"))["VerifierCompatible"]
    assert (
        compatible["reason"] == "PathNotAllowed"
        and "spec.draft.initFrom: '/home/me/drafts/v1'" in compatible["message"]
    )
    assert api.get("v1", "ConfigMap", "ml", "from-home-train") is None
