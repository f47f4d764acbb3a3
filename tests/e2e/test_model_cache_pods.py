"""`spec.modelCache` with pods really running (issue 18 #1): the flagship example, shrunk for CPU,
pulls its Hub verifier once for all its pods. One download pod fills the cache claim; the two
generators, the two trainer ranks and the evaluator read it read-only (the executor bind-mounts
it read-only, so a write would fail) and never reach the Hub: the local Hub stand-in counts every
file download and every request."""

from __future__ import annotations

import json

import pytest
from _controlplane import ControlPlane, OperatorProcess, until
from _executor import PodExecutor
from _resources import apply, condition, status_of
from test_pods_run import HUB_TOKEN, RWX, TINY, hub_secret, last_json, tiny_flagship, wait_complete

from specops.testing.hub import FakeHub
from specops.testing.tiny import tiny_verifier
from specops_operator.builders.training import TrainingNames

pytestmark = pytest.mark.e2e


def test_a_flagship_run_with_a_model_cache_downloads_the_verifier_once_for_all_its_pods(
    control_plane: ControlPlane, operator: OperatorProcess, executor: PodExecutor, pods_ns: str
) -> None:
    plane, ns = control_plane, pods_ns
    hub_secret(plane, ns)
    files = [p for p in tiny_verifier().iterdir() if p.is_file()]
    with FakeHub({TINY: tiny_verifier()}, token=HUB_TOKEN) as hub:  # its own counters
        cr = tiny_flagship(hub, max_steps=4)
        cr["spec"]["modelCache"] = RWX
        cr["spec"]["evaluation"] = {"maxPrompts": 2, "maxNewTokens": 8}
        name = cr["metadata"]["name"]
        names = TrainingNames(name, ns)
        child_fetch = f"{names.datagen}-gen-fetch"
        apply(plane, ns, cr)

        def downloaded() -> int | None:
            job = plane.kube().get("batch/v1", "Job", ns, child_fetch) or {}
            done = any(c.get("type") == "Complete" for c in (job.get("status") or {}).get("conditions") or [])
            return hub.requests if done else None

        after_download = until(downloaded, timeout=600, what="the download Job Complete", interval=0.5)
        status = wait_complete(plane, executor, ns, "SpeculatorTraining", name, timeout=900)

        # One pod downloaded each file once; no generator, trainer rank or evaluator asked the Hub.
        assert hub.downloads[TINY] == len(files), hub.downloads
        assert hub.requests == after_download, "a pod reached the Hub after the model cache was filled"
        assert hub.refused == 0
    fetched = last_json(executor.log(ns, f"{child_fetch}-"))
    assert fetched["files"] == len(files) and fetched["bytes"] == sum(p.stat().st_size for p in files)
    cache = executor.claim_dir(ns, f"{names.datagen}-gen-models") / "hub"
    assert fetched["path"].startswith("/model-cache/hub/models--specops-e2e--tiny-llama/snapshots/")
    assert (cache / "models--specops-e2e--tiny-llama" / "refs" / "main").read_text() == fetched["revision"]
    # Every stage ran from the cache: two generators, two trainer ranks, the evaluator.
    assert executor.exit_codes(ns, f"{child_fetch}-") == [0], "one download pod, no retry"
    generators = [
        code
        for pod in executor.pods.values()
        if pod.namespace == ns
        and pod.name.startswith(f"{names.datagen}-gen-")
        and not pod.name.startswith(child_fetch)
        for code in pod.exits
    ]
    assert generators == [0, 0], generators
    assert executor.exit_codes(ns, f"{names.job}-").count(0) == 2
    assert executor.exit_codes(ns, f"{names.eval_job}-") == [0]
    assert "rank 1 of world size 2" in executor.log(ns, f"{names.job}-")
    cached = condition(status_of(plane, "SpeculatorTraining", ns, name), "ModelCached")
    assert cached["status"] == "True" and fetched["revision"][:12] in cached["message"], cached
    assert status["evaluation"]["prompts"] > 0
    final = executor.claim_dir(ns, names.claim) / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == TINY, (
        "named by Hub id, not the cache path"
    )
