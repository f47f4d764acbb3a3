"""`spec.export` against an in-memory API server (kmock): the upload Job comes after the
evaluation, holds the credentials alone, and its outcome reaches `status.artifact` and the
Published condition; a failed upload keeps the artifact on the claim."""

from __future__ import annotations

import json
from typing import Any

from conftest import Api, Runner, example, fake_pod, job_done, job_failed

TR = ("specops.dev/v1alpha1", "SpeculatorTraining")
NAME = "llama31-8b-eagle3"
Obj = dict[str, Any]


def _conditions(api: Api) -> dict[str, Obj]:
    return {c["type"]: c for c in (api.get(*TR, "ml", NAME) or {}).get("status", {}).get("conditions") or []}


def _job(api: Api, suffix: str) -> Obj | None:
    return api.get("batch/v1", "Job", "ml", f"{NAME}-{suffix}")


def _container(job: Obj) -> Obj:
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(job).get("env") or []}


async def _finish(api: Api, component: str, suffix: str, report: Obj, exit_code: int = 0) -> None:
    """A pod of `component` ends with `report` and its Job succeeds (or fails)."""
    await api.create(
        fake_pod(NAME, "SpeculatorTraining", component, 0, exit_code=exit_code, message=json.dumps(report))
    )
    status = job_done(1) if exit_code == 0 else job_failed("PodFailurePolicy", "container exited")
    await api.patch("batch/v1", "Job", "ml", f"{NAME}-{suffix}", status, "status")


async def _trained(api: Api, export: Obj | None, evaluation: Obj | None = None) -> None:
    """The example trained (data generated, trainer done); `export`: None for a run without one."""
    cr = example("eagle3-train.yaml")
    if export is not None:
        cr["spec"]["export"] = export
    if evaluation is not None:
        cr["spec"]["evaluation"] = evaluation
    await api.create(cr)
    gen = f"{NAME}-data-gen"
    await api.until(lambda: api.get("batch/v1", "Job", "ml", gen), what="generator Job")
    await api.patch("batch/v1", "Job", "ml", gen, job_done(16), "status")
    await api.until(lambda: _job(api, "train"), what="trainer Job")
    await _finish(api, "trainer", "train", {"step": 100, "interrupted": False, "final": "/output/final"})
    await api.until(lambda: _conditions(api).get("Exported", {}).get("status") == "True", what="Exported")


async def test_the_upload_runs_after_the_evaluation_with_the_token_alone_and_sets_the_artifact_url(
    api: Api, operator: Runner
) -> None:
    await operator()
    hub = {
        "repo": "acme/llama31-eagle3",
        "private": True,
        "tokenSecret": {"name": "hf-write", "key": "token"},
    }
    await _trained(api, {"hub": hub})
    await api.until(lambda: _job(api, "eval"), what="evaluation Job")
    assert _job(api, "publish") is None, "uploaded before the evaluation measured the draft"
    published = _conditions(api)["Published"]
    assert published["status"] == "False" and published["reason"] == "NotEvaluated"
    assert _conditions(api)["Complete"]["status"] == "False"

    evaluation = {"acceptance_length": 3.2, "per_position": [0.8, 0.6, 0.4], "lossless": True, "prompts": 80}
    await _finish(api, "evaluator", "eval", evaluation)
    job = await api.until(lambda: _job(api, "publish"), what="upload Job")
    command = _container(job)["command"]
    push = command[command.index("specops") :]
    assert push == [
        *("specops", "push", "/output/final", "--repo", "acme/llama31-eagle3", "--private"),
        *("--eval-report", "/output/evaluation.json", "--allowed-root", "/output"),
    ]
    env = _env(job)
    # The export's own Secret replaces the workload pods' (read) HF_TOKEN in this pod only.
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-write", "key": "token"}}
    for other in ("train", "eval"):
        assert "hf-write" not in json.dumps(_job(api, other)), f"the {other} pods got the upload token"
    mounts = {m["name"]: m for m in _container(job)["volumeMounts"]}
    assert mounts["output"] == {"name": "output", "mountPath": "/output", "readOnly": True}
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "tolerations" not in pod
    assert "nvidia.com/gpu" not in json.dumps(_container(job)["resources"])

    url, commit = "https://huggingface.co/acme/llama31-eagle3", "0123456789abcdef0123456789abcdef01234567"
    await _finish(api, "publisher", "publish", {"url": url, "commit": commit, "files": ["README.md"]})
    await api.until(lambda: _conditions(api).get("Complete", {}).get("status") == "True", what="Complete")
    status = api.get(*TR, "ml", NAME)["status"]  # type: ignore[index]
    assert status["artifact"]["url"] == url and status["artifact"]["revision"] == commit
    assert status["artifact"]["path"] == "/output/final"
    conditions = _conditions(api)
    assert conditions["Published"]["status"] == "True" and conditions["Published"]["reason"] == "Uploaded"
    assert url in conditions["Published"]["message"]
    assert "uploaded to acme/llama31-eagle3" in conditions["Ready"]["message"]


async def test_a_failed_upload_leaves_the_run_complete_with_its_artifact_and_the_cause(
    api: Api, operator: Runner
) -> None:
    await operator()
    export = {
        "uri": "s3://drafts/llama",
        "endpointUrl": "http://minio.storage:9000",
        "credentialsSecret": {"name": "minio"},
    }
    await _trained(api, export, {"enabled": False})
    job = await api.until(
        lambda: _job(api, "publish"), what="upload Job right after training (no evaluation)"
    )
    command = _container(job)["command"]
    assert command[command.index("specops") :] == [
        *("specops", "push", "/output/final", "--to", "s3://drafts/llama"),
        *("--endpoint-url", "http://minio.storage:9000", "--allowed-root", "/output"),
    ]
    env = _env(job)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "minio", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    assert env["HF_TOKEN"]["secretKeyRef"]["name"] == "huggingface", "pod.env still applies"
    assert "minio" not in json.dumps(_job(api, "train"))

    error = "specops push: error: --to s3://drafts/llama: the object store refused the upload (Access Denied)"
    await _finish(api, "publisher", "publish", {"error": error}, exit_code=2)
    await api.until(lambda: _conditions(api).get("Complete", {}).get("status") == "True", what="Complete")
    conditions = _conditions(api)
    assert conditions["Failed"]["status"] == "False"
    assert (
        conditions["Published"]["status"] == "False" and conditions["Published"]["reason"] == "UploadFailed"
    )
    assert "refused the upload (Access Denied)" in conditions["Published"]["message"]
    assert "upload failed" in conditions["Ready"]["message"]
    artifact = api.get(*TR, "ml", NAME)["status"]["artifact"]  # type: ignore[index]
    assert artifact["path"] == "/output/final" and "url" not in artifact


async def test_a_draft_whose_evaluation_failed_is_not_uploaded(api: Api, operator: Runner) -> None:
    await operator()
    await _trained(api, {"hub": {"repo": "acme/x"}})
    await api.until(lambda: _job(api, "eval"), what="evaluation Job")
    await _finish(api, "evaluator", "eval", {"error": "not lossless"}, exit_code=4)
    await api.until(lambda: _conditions(api).get("Complete", {}).get("status") == "True", what="Complete")
    assert _job(api, "publish") is None
    published = _conditions(api)["Published"]
    assert published["status"] == "False" and published["reason"] == "EvaluationFailed"
    assert "specops push" in published["message"]
