"""`spec.export.hub` with pods really running (issue 20 #4): the tiny flagship trains, evaluates,
then its upload pod pushes the draft to the local Hub stand-in with the token of its own Secret
(which no other pod gets); `status.artifact` carries the repository URL and the commit. A
`specops.dev/retry-upload` annotation on the completed run then replaces the finished upload Job
(the real garbage collector's foreground deletion) and uploads once more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _controlplane import ControlPlane, OperatorProcess, until
from _executor import PodExecutor
from _resources import apply, condition, status_of
from test_pods_run import HUB_TOKEN, TINY, hub_secret, last_json, tiny_flagship, wait_complete

from specops.testing.hub import FakeHub
from specops.testing.tiny import tiny_verifier
from specops_operator import API_VERSION
from specops_operator.builders.training import TrainingNames

pytestmark = pytest.mark.e2e
REPO = "specops-e2e/tiny-eagle3-draft"


def test_a_training_with_export_hub_ends_with_the_draft_on_the_hub_and_its_url_in_status(
    control_plane: ControlPlane,
    operator: OperatorProcess,
    executor: PodExecutor,
    pods_ns: str,
    tmp_path: Path,
) -> None:
    plane, ns = control_plane, pods_ns
    hub_secret(plane, ns)
    write = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub-write"}}
    apply(plane, ns, {**write, "stringData": {"token": HUB_TOKEN}})
    with FakeHub({TINY: tiny_verifier()}, token=HUB_TOKEN, uploads=tmp_path / "hub") as hub:
        cr = tiny_flagship(hub, max_steps=4)
        cr["spec"].update(nodes=1, evaluation={"maxPrompts": 2, "maxNewTokens": 8})
        cr["spec"]["export"] = {"hub": {"repo": REPO, "tokenSecret": {"name": "hub-write", "key": "token"}}}
        name = cr["metadata"]["name"]
        names = TrainingNames(name, ns)
        apply(plane, ns, cr)
        status = wait_complete(plane, executor, ns, "SpeculatorTraining", name, timeout=900)
        repo = hub.repos[REPO]
        commits = list(hub.commits)
        first = repo.commit

        # The same export once more (a fixed Secret would be the reason): the completed run
        # replaces its finished upload Job and pushes a second commit; it stays Complete.
        retry = {"metadata": {"annotations": {"specops.dev/retry-upload": "1"}}}
        plane.kube().patch(API_VERSION, "SpeculatorTraining", ns, name, retry)

        def uploaded_again() -> dict[str, object] | None:
            now = status_of(plane, "SpeculatorTraining", ns, name)
            done = (now.get("upload") or {}).get("retry") == "1"
            return now if done and condition(now, "Published").get("reason") == "Uploaded" else None

        retried = until(uploaded_again, timeout=300, what="the retried upload", interval=1.0)
        assert len(hub.commits) == 2, (
            "uploaded once more"
        )  # same files: the stand-in gives the same commit id
        assert retried["artifact"]["revision"] == repo.commit
        assert condition(retried, "Complete")["status"] == "True"

    final = executor.claim_dir(ns, names.claim) / "final"
    assert sorted(repo.files) == ["README.md", "config.json", "model.safetensors"]
    for file in ("config.json", "model.safetensors"):
        assert repo.files[file].read_bytes() == (final / file).read_bytes()
    card = repo.files["README.md"].read_text()
    accepted = status["evaluation"]["acceptanceLength"]
    assert f"acceptance length **{accepted:.3f}**" in card, "the card carries the evaluation's figures"
    assert len(commits) == 1

    published = condition(status, "Published")
    assert published["status"] == "True" and published["reason"] == "Uploaded", published
    assert status["artifact"]["url"] == f"{hub.url}/{REPO}"
    assert status["artifact"]["revision"] == first
    assert status["artifact"]["path"] == "/output/final"
    assert executor.exit_codes(ns, f"{names.publish_job}-") == [0]
    assert last_json(executor.log(ns, f"{names.publish_job}-"))["url"] == f"{hub.url}/{REPO}"
    # The write token's Secret reached the upload pod only.
    for job in (names.job, names.eval_job):
        got = plane.kube().get("batch/v1", "Job", ns, job)
        assert got is not None and "hub-write" not in json.dumps(got["spec"]), job
