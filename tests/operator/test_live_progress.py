"""`kubectl get speculatortrainings -w` moves during training: status.progress follows rank 0's
metrics; a SpeculatorDataGen's follows its running generators'."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from test_reconcile import DG, TR, _condition

from conftest import Api, Runner, example, job_done
from specops.generate import GenerateReport
from specops.generate_progress import AnswerProgress, GenerationProgress
from specops.stores.streaming import MetricsServer
from specops.train.progress import Progress

TRAINING = "llama31-8b-eagle3"
DATAGEN = "qwen3-8b-sharegpt"
Obj = dict[str, Any]


def _rank0_pod(port: int) -> Obj:
    """A running rank-0 trainer pod as the kubelet reports it: its IP and its `metrics` port."""
    return _running_pod("SpeculatorTraining", TRAINING, "trainer", f"{TRAINING}-train", 0, port)


def _running_pod(kind: str, owner: str, component: str, job: str, index: int, port: int) -> Obj:
    """A running pod of a workload Job as the kubelet reports it: its IP and its `metrics` port."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-{index}-abcde",
            "namespace": "ml",
            "labels": {
                "app.kubernetes.io/instance": owner,
                "app.kubernetes.io/component": component,
                "specops.dev/kind": kind,
            },
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {
            "containers": [
                {"name": "workload", "image": "x", "ports": [{"name": "metrics", "containerPort": port}]}
            ]
        },
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }


def _progress(api: Api) -> Obj:
    return dict(((api.get(*TR, "ml", TRAINING) or {}).get("status") or {}).get("progress") or {})


async def test_status_progress_follows_rank_zero_while_training(api: Api, operator: Runner) -> None:
    await operator(interval=0.3)
    await api.create(example("eagle3-train.yaml"))
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{TRAINING}-data-gen"), what="generator Job")
    await api.patch("batch/v1", "Job", "ml", f"{TRAINING}-data-gen", job_done(16), "status")
    await api.until(lambda: api.get("batch/v1", "Job", "ml", f"{TRAINING}-train"), what="trainer Job")

    progress = Progress(rank=0, total_steps=1000, start_step=0)
    server = MetricsServer(0, progress, "127.0.0.1")
    try:
        progress.advance(40, 0)
        progress.record("train", {"loss": 2.5, "tokens_per_s": 1234.5})
        progress.values["eta_seconds"] = 5400.0
        await api.create(_rank0_pod(server.port))
        await api.patch(
            "batch/v1", "Job", "ml", f"{TRAINING}-train", {"status": {"active": 2, "ready": 2}}, "status"
        )
        await api.until(lambda: _progress(api).get("step") == 40, timeout=10, what="live step 40")
        live = _progress(api)
        assert live["totalSteps"] == 1000 and live["loss"] == 2.5 and live["tokensPerSecond"] == 1234.5
        assert live["etaSeconds"] == 5400 and live["eta"] == "1h30m" and live["updatedAt"]
        before = copy.deepcopy(live)

        progress.advance(700, 1)
        progress.record("train", {"loss": 1.25})
        progress.values["eta_seconds"] = 90.0
        await api.until(lambda: _progress(api).get("step") == 700, timeout=10, what="live step 700")
        assert _progress(api)["loss"] == 1.25 and _progress(api)["eta"] == "2m"
    finally:
        server.close()

    # The endpoint is gone (the pod restarts, a policy): the last figures stay, nothing fails.
    await asyncio.sleep(1.5)  # several refreshes
    assert _progress(api)["step"] == 700 and _progress(api)["loss"] == 1.25
    assert before["updatedAt"] <= _progress(api)["updatedAt"]
    await api.patch("batch/v1", "Job", "ml", f"{TRAINING}-train", job_done(2), "status")
    await api.until(_condition(api, TR, TRAINING, "Exported"), what="Exported")
    assert _progress(api)["etaSeconds"] == 0 and _progress(api)["eta"] == "0m"


def _datagen_progress(api: Api) -> Obj:
    return dict(((api.get(*DG, "ml", DATAGEN) or {}).get("status") or {}).get("progress") or {})


async def test_datagen_progress_follows_the_running_generators(api: Api, operator: Runner) -> None:
    """Two generator pods serve their slices' progress: status sums what they processed and
    expect, and shows the slower one's ETA; a generator still loading has no ETA, so none shows."""
    await operator(interval=0.3)
    await api.create(example("datagen-offline.yaml"))
    job = f"{DATAGEN}-gen"
    await api.until(lambda: api.get("batch/v1", "Job", "ml", job), what="generator Job")
    reports = [GenerateReport(), GenerateReport()]
    progress = [GenerationProgress(report, index, 8) for index, report in enumerate(reports)]
    servers = [MetricsServer(0, p, "127.0.0.1") for p in progress]
    try:
        for index, server in enumerate(servers):
            await api.create(_running_pod("SpeculatorDataGen", DATAGEN, "generator", job, index, server.port))
        progress[0].expect(100)
        progress[0].start()
        reports[0].written, reports[0].dropped = 40, 2
        progress[1].expect(80)  # still loading its model: no rate, no ETA yet
        await api.patch("batch/v1", "Job", "ml", job, {"status": {"active": 2, "ready": 2}}, "status")
        await api.until(
            lambda: _datagen_progress(api).get("runningTotal") == 180, timeout=10, what="live total"
        )
        live = _datagen_progress(api)
        assert live["runningDone"] == 42 and live["updatedAt"] and "etaSeconds" not in live, live
        assert "runningAnswered" not in live and "runningAnswerTotal" not in live, "neither answers"

        answers = AnswerProgress(reports[1], 1, 8)  # generator 1 answers its prompts first
        answers.expect(30)
        answers.add(12, 11, 400)
        progress[1].answers = answers
        await api.until(
            lambda: _datagen_progress(api).get("runningAnswered") == 12, timeout=10, what="answers"
        )
        assert _datagen_progress(api)["runningAnswerTotal"] == 30

        progress[1].start()
        reports[1].written = 10
        await api.until(lambda: _datagen_progress(api).get("runningDone") == 52, timeout=10, what="live 52")
        await api.until(lambda: "eta" in _datagen_progress(api), timeout=10, what="an ETA")
        assert _datagen_progress(api)["etaSeconds"] >= 0
    finally:
        for server in servers:
            server.close()
    await api.patch("batch/v1", "Job", "ml", job, job_done(8), "status")
    await api.until(_condition(api, DG, DATAGEN, "Complete"), what="Complete")
    done = _datagen_progress(api)
    assert done["etaSeconds"] == 0 and done["eta"] == "0m" and done["runningDone"] == 52
