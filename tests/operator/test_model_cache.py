"""`spec.modelCache` against the in-memory API server (issue 18 #1): the cache claim and the
download Job come first, generators and trainer only once it succeeded, every reading pod mounts
the claim read-only with the env that keeps it offline, and a failed download fails the run
naming its cause."""

from __future__ import annotations

import json
from typing import Any

from test_reconcile import DG, OFFLINE, TR, _conditions, _settle

from conftest import Api, Runner, example, fake_pod, job_done, job_failed

TRAINING = "llama31-8b-eagle3"
CHILD = f"{TRAINING}-data"
FETCH = f"{OFFLINE}-gen-fetch"
CLAIM = f"{OFFLINE}-gen-models"
Obj = dict[str, Any]
REPORT = {"verifier": "Qwen/Qwen3-8B", "revision": "a" * 40, "path": "/x", "files": 12, "bytes": 16 * 2**30}


def _job(api: Api, name: str) -> Obj | None:
    return api.get("batch/v1", "Job", "ml", name)


def _pod_spec(job: Obj) -> Obj:
    return dict(job["spec"]["template"]["spec"])


def _cache_mount(job: Obj) -> tuple[Obj, Obj, dict[str, str]]:
    """(volume, mount, env) of the model cache in a Job's pod template."""
    spec = _pod_spec(job)
    container = spec["containers"][0]
    volume = next(v for v in spec["volumes"] if v["name"] == "model-cache")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
    env = {e["name"]: e.get("value") for e in container["env"]}
    return volume, mount, env


def _ready(api: Api, kind: tuple[str, str], name: str) -> Obj:
    return _conditions(api.get(*kind, "ml", name)).get("Ready", {})


async def _fail_fetch(
    api: Api, instance: str, job: str, error: str, failed: tuple[tuple[str, str], str]
) -> dict[str, Obj]:
    """The download pod exits 2 with `error` and its Job fails; returns the conditions of
    `failed` (kind, name) once it is Failed."""
    await api.create(fake_pod(instance, "SpeculatorDataGen", "fetcher", 0, exit_code=2, message=error))
    await api.patch("batch/v1", "Job", "ml", job, job_failed("PodFailurePolicy", "exited 2"), "status")
    kind, name = failed
    await api.until(
        lambda: _conditions(api.get(*kind, "ml", name)).get("Failed", {}).get("status") == "True",
        what=f"{name} Failed",
    )
    return _conditions(api.get(*kind, "ml", name))


async def _inline_training(api: Api, operator: Runner) -> str:
    """examples/eagle3-train.yaml with a model cache, once its child's download Job exists (its name)."""
    await operator()
    cr = example("eagle3-train.yaml")
    cr["spec"]["modelCache"] = {"size": "40Gi"}
    await api.create(cr)
    child_fetch = f"{CHILD}-gen-fetch"
    await api.until(lambda: _job(api, child_fetch), what="the child's download Job")
    return child_fetch


async def _finish_fetch(api: Api, instance: str, kind: str, job: str) -> None:
    await api.create(fake_pod(instance, kind, "fetcher", 0, exit_code=0, message=json.dumps(REPORT)))
    await api.patch("batch/v1", "Job", "ml", job, job_done(1), "status")


async def test_download_job_fills_the_claim_before_any_generator_and_generators_read_it_offline(
    api: Api, operator: Runner
) -> None:
    await operator()
    cr = example("datagen-offline.yaml")
    cr["spec"]["modelCache"] = {"size": "40Gi", "storageClassName": "efs-sc"}
    cr["spec"]["pod"]["env"] = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}
    ]
    await api.create(cr)
    fetch = await api.until(lambda: _job(api, FETCH), what="download Job")
    claim = api.get("v1", "PersistentVolumeClaim", "ml", CLAIM)
    assert claim is not None and claim["spec"]["resources"]["requests"]["storage"] == "40Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "efs-sc"
    assert claim["metadata"]["ownerReferences"], "a model cache is not retained unless asked"
    # The download pod: the verifier, its cache dir in the claim (writable), the token, no GPU.
    container = _pod_spec(fetch)["containers"][0]
    assert container["command"][4:6] == ["specops", "fetch-verifier"], container["command"]
    assert container["command"][container["command"].index("--verifier") + 1] == "Qwen/Qwen3-8B"
    assert container["command"][container["command"].index("--cache-dir") + 1] == "/model-cache/hub"
    volume, mount, env = _cache_mount(fetch)
    assert volume["persistentVolumeClaim"] == {"claimName": CLAIM} and "readOnly" not in mount
    assert "HF_TOKEN" in env and "SPECOPS_MODEL_CACHE" not in env
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert fetch["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3, 4]
    # Until it succeeded: no generator Job, and status says what the run is doing.
    await api.until(
        lambda: _ready(api, DG, OFFLINE).get("reason") == "DownloadingModel", what="DownloadingModel"
    )
    await _settle(api)
    assert _job(api, f"{OFFLINE}-gen") is None, "a generator started before the model cache was filled"
    cached = _conditions(api.get(*DG, "ml", OFFLINE))["ModelCached"]
    assert (cached["status"], cached["reason"]) == ("False", "DownloadingModel")
    await _finish_fetch(api, OFFLINE, "SpeculatorDataGen", FETCH)
    generator = await api.until(lambda: _job(api, f"{OFFLINE}-gen"), what="generator Job")
    volume, mount, env = _cache_mount(generator)
    assert volume["persistentVolumeClaim"] == {"claimName": CLAIM, "readOnly": True}
    assert mount == {"name": "model-cache", "mountPath": "/model-cache", "readOnly": True}
    assert env["SPECOPS_MODEL_CACHE"] == "/model-cache/hub" and "HF_HUB_OFFLINE" not in env
    await api.until(
        lambda: _conditions(api.get(*DG, "ml", OFFLINE)).get("ModelCached", {}).get("status") == "True",
        what="ModelCached=True",
    )
    message = _conditions(api.get(*DG, "ml", OFFLINE))["ModelCached"]["message"]
    assert message == f"Qwen/Qwen3-8B at aaaaaaaaaaaa in claim {CLAIM}: 12 files, 16.0Gi", message
    # The recorded download is never repeated: its Job, once gone (TTL), is not created again.
    await api.delete("batch/v1", "Job", "ml", FETCH)
    await _settle(api)
    assert _job(api, FETCH) is None and _job(api, f"{OFFLINE}-gen") is not None


async def test_a_failed_download_fails_the_run_with_its_cause_and_starts_no_generator(
    api: Api, operator: Runner
) -> None:
    await operator()
    cr = example("datagen-offline.yaml")
    cr["spec"]["modelCache"] = {"existingClaim": "shared-models"}
    await api.create(cr)
    fetch = await api.until(lambda: _job(api, FETCH), what="download Job")
    assert _cache_mount(fetch)[0]["persistentVolumeClaim"] == {"claimName": "shared-models"}
    assert api.get("v1", "PersistentVolumeClaim", "ml", CLAIM) is None, "an existing claim is not created"
    error = (
        "specops fetch-verifier: error: verifier.name_or_path: 'Qwen/Qwen3-8B': access refused "
        "(set HF_TOKEN to a token that may read it)"
    )
    conditions = await _fail_fetch(api, OFFLINE, FETCH, error, (DG, OFFLINE))
    assert conditions["Failed"]["reason"] == "DownloadFailed"
    assert "access refused (set HF_TOKEN" in conditions["Failed"]["message"]
    assert conditions["ModelCached"]["reason"] == "DownloadFailed"
    await _settle(api)
    assert _job(api, f"{OFFLINE}-gen") is None


async def test_an_inline_data_generation_shares_the_trainings_cache_and_the_trainer_waits_for_it(
    api: Api, operator: Runner
) -> None:
    child_fetch = await _inline_training(api, operator)
    child = api.get(*DG, "ml", CHILD)
    assert child is not None and child["spec"]["modelCache"] == {"size": "40Gi"}
    await api.until(
        lambda: _ready(api, TR, TRAINING).get("reason") == "DownloadingModel", what="DownloadingModel"
    )
    assert _job(api, f"{TRAINING}-train-fetch") is None, "the training downloaded a second time"
    assert _job(api, f"{CHILD}-gen") is None
    await _finish_fetch(api, CHILD, "SpeculatorDataGen", child_fetch)
    generator = await api.until(lambda: _job(api, f"{CHILD}-gen"), what="generator Job")
    assert _cache_mount(generator)[0]["persistentVolumeClaim"]["claimName"] == f"{CHILD}-gen-models"
    await api.patch("batch/v1", "Job", "ml", f"{CHILD}-gen", job_done(16), "status")
    trainer = await api.until(lambda: _job(api, f"{TRAINING}-train"), what="trainer Job")
    volume, mount, env = _cache_mount(trainer)
    assert volume["persistentVolumeClaim"] == {"claimName": f"{CHILD}-gen-models", "readOnly": True}
    assert mount["readOnly"] is True and env["SPECOPS_MODEL_CACHE"] == "/model-cache/hub"
    cached = _conditions(api.get(*TR, "ml", TRAINING))["ModelCached"]
    assert cached["status"] == "True" and f"{CHILD}-gen-models" in cached["message"]
    await api.patch("batch/v1", "Job", "ml", f"{TRAINING}-train", job_done(1), "status")
    evaluator = await api.until(lambda: _job(api, f"{TRAINING}-eval"), what="evaluation Job")
    assert _cache_mount(evaluator)[1]["readOnly"] is True


async def test_a_training_reading_a_datagen_downloads_once_into_its_claim_before_the_trainer(
    api: Api, operator: Runner
) -> None:
    """dataGenRef: the training's own download Job; two trainings naming one existing claim both
    fill it (files already there are skipped by the download itself) and create no claim."""
    await operator()
    datagen = example("datagen-offline.yaml")
    await api.create(datagen)
    await api.until(lambda: _job(api, f"{OFFLINE}-gen"), what="generator Job")
    await api.patch("batch/v1", "Job", "ml", f"{OFFLINE}-gen", job_done(8), "status")
    names = []
    for name in ("hass-a", "hass-b"):
        training = example("hass-train.yaml")
        training["metadata"]["name"] = name
        training["spec"]["dataGenRef"] = {"name": OFFLINE}
        training["spec"]["modelCache"] = {"existingClaim": "models"}
        await api.create(training)
        names.append(name)
    for name in names:
        fetch = await api.until(lambda n=name: _job(api, f"{n}-train-fetch"), what="download Job")
        assert _cache_mount(fetch)[0]["persistentVolumeClaim"] == {"claimName": "models"}
        assert "--revision" not in _pod_spec(fetch)["containers"][0]["command"]
    await api.until(
        lambda: (
            (_conditions(api.get(*DG, "ml", OFFLINE)).get("ShardsComplete") or {}).get("status") == "True"
        ),
        what="ShardsComplete",
    )
    await api.until(
        lambda: _ready(api, TR, "hass-a").get("reason") == "DownloadingModel", what="DownloadingModel"
    )
    await _settle(api)
    assert _job(api, "hass-a-train") is None, "the trainer started before the model cache was filled"
    assert not [c for c in api.children("PersistentVolumeClaim") if "models" in c["metadata"]["name"]]
    await _finish_fetch(api, "hass-a", "SpeculatorTraining", "hass-a-train-fetch")
    trainer = await api.until(lambda: _job(api, "hass-a-train"), what="trainer Job")
    assert _cache_mount(trainer)[0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert _job(api, "hass-b-train") is None


async def test_a_model_cache_smaller_than_the_weights_stalls_before_any_child(
    api: Api, operator: Runner
) -> None:
    await operator()
    cr = example("datagen-offline.yaml")
    cr["spec"]["modelCache"] = {"size": "10Gi"}
    await api.create(cr)
    await api.until(
        lambda: _ready(api, DG, OFFLINE).get("reason") == "StorageTooSmall", what="StorageTooSmall"
    )
    message = _ready(api, DG, OFFLINE)["message"]
    assert "spec.modelCache.size 10Gi is smaller than Qwen/Qwen3-8B's weights" in message, message
    assert _job(api, FETCH) is None and api.get("v1", "PersistentVolumeClaim", "ml", CLAIM) is None


async def test_a_failed_download_of_an_inline_data_generation_reaches_the_trainings_status(
    api: Api, operator: Runner
) -> None:
    child_fetch = await _inline_training(api, operator)
    error = "specops fetch-verifier: error: verifier.name_or_path: 'meta-llama/Llama-3.1-8B-Instruct': no such revision"
    conditions = await _fail_fetch(api, CHILD, child_fetch, error, (TR, TRAINING))
    assert conditions["Failed"]["reason"] == "DataGenFailed"
    assert (
        "DownloadFailed" in conditions["Failed"]["message"]
        and "no such revision" in conditions["Failed"]["message"]
    )
    assert conditions["ModelCached"]["reason"] == "DownloadFailed"
    assert _job(api, f"{CHILD}-gen") is None and _job(api, f"{TRAINING}-train") is None
