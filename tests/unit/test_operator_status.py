"""Status from observed children: phases, progress from termination reports, artifact, terminal runs."""

from __future__ import annotations

import json
import shlex
from typing import Any

from _operator_support import ROOT

from specops_operator.api import SpeculatorDataGen, SpeculatorTraining, load_resources
from specops_operator.builders.datagen import DataGenNames
from specops_operator.builders.training import DataSource
from specops_operator.conditions import Phase, find
from specops_operator.jobs import JobView, format_ranges, parse_ranges
from specops_operator.status import (
    Observed,
    claim_problem,
    create_problem,
    datagen_status,
    failure_detail,
    finished_components,
    hold_ttl,
    is_terminal,
    may_create,
    pending_detail,
    running_pods,
    settled_status,
    stalled_status,
    training_status,
    vllm_serve_command,
    waiting_status,
)

NOW = "2026-01-01T00:00:00Z"
Obj = dict[str, Any]


def _cr(name: str, index: int = 0, labels: dict[str, str] | None = None) -> Any:
    cr = load_resources((ROOT / "examples" / name).read_text())[index]
    cr.metadata.namespace, cr.metadata.uid, cr.metadata.generation = "ml", "uid-1", 4
    cr.metadata.labels.update(labels or {})
    return cr


def _job(**status: Any) -> Obj:
    conditions = [{"type": t, "status": "True", **extra} for t, extra in status.pop("conditions", {}).items()]
    return {"spec": {"suspend": status.pop("suspend", False)}, "status": {**status, "conditions": conditions}}


def _pod(index: int, exit_code: int, message: str, finished: str = NOW) -> Obj:
    return {
        "metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": "workload",
                    "state": {
                        "terminated": {"exitCode": exit_code, "message": message, "finishedAt": finished}
                    },
                }
            ],
        },
    }


def _cond(status: Obj, type_: str) -> Obj:
    found = find(status["conditions"], type_)
    assert found is not None, type_
    return found


def test_ranges_round_trip() -> None:
    assert parse_ranges("0-3,7,9-10") == {0, 1, 2, 3, 7, 9, 10}
    assert format_ranges({0, 1, 2, 3, 7, 9, 10}) == "0-3,7,9-10"
    assert parse_ranges("") == set() and format_ranges(set()) == ""


def test_job_view_reads_counters_and_conditions() -> None:
    view = JobView.of(
        _job(
            active=2,
            succeeded=3,
            failedIndexes="4,6-7",
            conditions={"Failed": {"reason": "X", "message": "m"}},
        )
    )
    assert (view.active, view.succeeded, view.failed_indexes, view.failed, view.reason) == (
        2,
        3,
        3,
        True,
        "X",
    )
    assert JobView.of(None) == JobView()


def test_datagen_progress_counts_each_shard_once() -> None:
    cr = _cr("datagen-offline.yaml")
    report = json.dumps({"written": 10, "skipped": 2, "tokens": 1000, "seconds": 4.0})
    pods = (*(_pod(i, 0, report) for i in range(4)), _pod(5, 1, "specops: error"))
    first = datagen_status(cr, {}, Observed(job=_job(active=2, ready=2, succeeded=4), pods=pods), NOW)
    assert first["progress"]["examples"] == 48 and first["progress"]["countedIndexes"] == "0-3"
    again = datagen_status(cr, first, Observed(job=_job(active=2, ready=2, succeeded=4), pods=pods), NOW)
    assert again["progress"] == first["progress"], "a refresh must not count a report twice"
    assert again["progress"]["tokensPerSecond"] == 250.0 and again["progress"]["shards"] == "4/8"
    assert _cond(again, "Running")["status"] == "True" and again["workers"] == 2
    assert again["selector"].startswith("app.kubernetes.io/component=generator")
    assert again["observedGeneration"] == 4 and _cond(again, "ShardsComplete")["status"] == "False"


def test_datagen_waiting_for_kueue_and_suspended() -> None:
    cr = _cr("datagen-offline.yaml", labels={"kueue.x-k8s.io/queue-name": "gpus"})
    status = datagen_status(cr, {}, Observed(job=_job(suspend=True)), NOW)
    assert (
        _cond(status, "Ready")["reason"] == "WaitingForAdmission"
        and "Kueue" in _cond(status, "Ready")["message"]
    )
    cr.spec.suspend = True
    status = datagen_status(cr, status, Observed(job=_job(suspend=True)), NOW)
    assert (
        _cond(status, "Suspended")["status"] == "True" and _cond(status, "Reconciling")["status"] == "False"
    )


def test_datagen_failure_names_the_workload_error() -> None:
    cr = _cr("datagen-offline.yaml")
    pods = (_pod(0, 2, "loading tokenizer\nspecops generate-data: error: datasets[0].path: missing\n"),)
    job = _job(failed=1, conditions={"Failed": {"reason": "PodFailurePolicy", "message": "exit code 2"}})
    status = datagen_status(cr, {}, Observed(job=job, pods=pods), NOW)
    failed = _cond(status, "Failed")
    assert failed["reason"] == "ConfigError"
    assert failed["message"] == "exit code 2; specops generate-data: error: datasets[0].path: missing"
    assert is_terminal(status)


def test_failure_detail_takes_the_newest_error_line() -> None:
    pods = [
        _pod(0, 1, "old error", "2026-01-01T00:00:00Z"),
        _pod(0, 1, "x\nRuntimeError: CUDA error\nmore", "2026-01-02T00:00:00Z"),
    ]
    assert failure_detail(pods) == "RuntimeError: CUDA error"
    assert failure_detail([_pod(0, 0, "fine")]) == ""


def test_online_datagen_reports_the_broker() -> None:
    cr = _cr("datagen-online.yaml")
    down = datagen_status(cr, {}, Observed(job=_job(active=4), broker={"status": {"readyReplicas": 0}}), NOW)
    assert _cond(down, "StreamConnected")["status"] == "False"
    up = datagen_status(cr, down, Observed(job=_job(active=4), broker={"status": {"readyReplicas": 1}}), NOW)
    assert _cond(up, "StreamConnected")["status"] == "True"
    assert up["brokerUrl"] == "tcp://llama32-1b-online-broker.ml.svc:5555"


def _data(name: str = "datagen-offline.yaml", index: int = 0, **conditions: str) -> DataSource:
    cr = _cr(name, index)
    assert isinstance(cr, SpeculatorDataGen)
    status = {
        "conditions": [{"type": k, "status": v} for k, v in conditions.items()],
        "progress": {"shards": "3/8"},
    }
    return DataSource(DataGenNames(cr.metadata.name, "ml"), cr.spec, status)


def test_training_phases() -> None:
    cr = _cr("hass-train.yaml")
    assert isinstance(cr, SpeculatorTraining)
    waiting = training_status(cr, {}, _data(), Observed(), NOW)
    assert (
        _cond(waiting, "Ready")["reason"] == "WaitingForData" and "3/8" in _cond(waiting, "Ready")["message"]
    )
    failed = training_status(cr, {}, _data(Failed="True"), Observed(), NOW)
    assert _cond(failed, "Ready")["reason"] == "DataGenFailed"
    running = training_status(
        cr, {}, _data(ShardsComplete="True"), Observed(job=_job(active=2, ready=2)), NOW
    )
    assert _cond(running, "Running")["status"] == "True" and running["progress"]["nodesActive"] == 2
    report = json.dumps({"step": 900, "best_val_loss": 2.5})
    trained = training_status(
        cr,
        running,
        _data(ShardsComplete="True"),
        Observed(job=_job(conditions={"Complete": {}}), pods=(_pod(0, 0, report),)),
        NOW,
    )
    assert (
        _cond(trained, "Exported")["status"] == "True"
        and _cond(trained, "Ready")["reason"] == "StartingEvaluation"
    )
    assert trained["progress"] == {"step": 900, "nodesActive": 0, "bestValLoss": 2.5}
    assert (
        trained["artifact"]["claimName"] == "qwen3-8b-hass-output"
        and trained["artifact"]["algorithm"] == "hass"
    )
    evaluated = training_status(
        cr,
        trained,
        _data(ShardsComplete="True"),
        Observed(
            job=_job(conditions={"Complete": {}}),
            eval_job=_job(conditions={"Complete": {}}),
            eval_pods=(
                _pod(
                    0,
                    0,
                    json.dumps(
                        {"acceptance_length": 2.75, "per_position": [0.7], "lossless": True, "prompts": 32}
                    ),
                ),
            ),
        ),
        NOW,
    )
    assert (
        _cond(evaluated, "Complete")["status"] == "True"
        and evaluated["evaluation"]["acceptanceLength"] == 2.75
    )
    assert evaluated["progress"]["step"] == 900, "the step survives refreshes that read no pods"


def test_online_training_skips_evaluation() -> None:
    cr = _cr("datagen-online.yaml", 1)
    data = _data("datagen-online.yaml", StreamConnected="True")
    done = training_status(cr, {}, data, Observed(job=_job(conditions={"Complete": {}})), NOW)
    assert _cond(done, "Complete")["status"] == "True"
    assert _cond(done, "Evaluated")["reason"] == "Disabled"


def test_vllm_serve_command_is_exact_and_shell_safe() -> None:
    command = vllm_serve_command("meta-llama/Llama-3.1-8B-Instruct", "/output/final", "hass", 4)
    assert command == (
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --speculative-config "
        '\'{"method": "eagle3", "model": "/output/final", "num_speculative_tokens": 4}\''
    )
    argv = shlex.split(command)
    assert json.loads(argv[-1])["num_speculative_tokens"] == 4


def test_terminal_and_retryable_failures() -> None:
    stalled = stalled_status(2, {}, "LayerOutOfRange", "layers", NOW, "VerifierCompatible")
    assert not is_terminal(stalled), "a spec problem is re-checked, never final"
    assert _cond(stalled, "VerifierCompatible")["status"] == "False"
    assert _cond(stalled, "Stalled")["status"] == "True"
    complete = {
        "conditions": [{"type": "Complete", "status": "True", "observedGeneration": 1}],
        "observedGeneration": 1,
    }
    assert is_terminal(complete)
    settled = settled_status(3, complete)
    assert settled["observedGeneration"] == 3 and settled["conditions"][0]["observedGeneration"] == 3
    waiting = waiting_status(1, {}, "not found", NOW, overdue=False)
    assert _cond(waiting, "Reconciling")["status"] == "True" and not is_terminal(waiting)


def _live(name: str, phase: str, **status: Any) -> Obj:
    return {"metadata": {"name": name}, "status": {"phase": phase, **status}}


def test_only_running_pods_count_as_running() -> None:
    cr = _cr("datagen-offline.yaml")
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes",
    }
    pods = (_live("g-0", "Pending", conditions=[unschedulable]), _live("g-1", "Pending"))
    job = _job(active=2)  # Job.status.active counts Pending pods
    assert (
        running_pods(JobView.of(job), pods) == 0
        and running_pods(JobView.of(_job(active=2, ready=1)), ()) == 1
    )
    pending = datagen_status(cr, {}, Observed(job=job, pods=pods), NOW)
    ready = _cond(pending, "Ready")
    assert (ready["reason"], ready["message"]) == ("Unschedulable", "pod g-0: 0/3 nodes")
    assert _cond(pending, "Running")["status"] == "False" and pending["workers"] == 0
    half = datagen_status(cr, {}, Observed(job=job, pods=(_live("g-0", "Running"), pods[0])), NOW)
    assert _cond(half, "Running")["status"] == "True" and half["workers"] == 1
    assert "1 generator pods running; 1 not running (pod g-0: 0/3 nodes)" in _cond(half, "Ready")["message"]
    pulling = {
        "name": "workload",
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
    }
    assert pending_detail([_live("g-2", "Pending", containerStatuses=[pulling])]) == (
        "PodsNotStarting",
        "pod g-2: ImagePullBackOff: no such image",
    )


def _event(kind: str, name: str, reason: str, message: str, type_: str = "Warning") -> Obj:
    return {
        "involvedObject": {"kind": kind, "name": name},
        "type": type_,
        "reason": reason,
        "message": message,
    }


def test_claims_and_jobs_that_cannot_progress() -> None:
    claim = {"metadata": {"name": "d-data", "namespace": "ml"}, "status": {"phase": "Pending"}}
    waiting = claim_problem(
        claim, [_event("PersistentVolumeClaim", "d-data", "WaitForFirstConsumer", "", "Normal")]
    )
    assert waiting is not None and waiting[1] == "WaitingForStorage"
    missing = 'storageclass.storage.k8s.io "shared-rwx" not found'
    blocked = claim_problem(claim, [_event("PersistentVolumeClaim", "d-data", "ProvisioningFailed", missing)])
    assert blocked == (
        Phase.BLOCKED,
        "StorageNotBound",
        f"PersistentVolumeClaim ml/d-data is Pending: {missing}",
    )
    assert claim_problem({**claim, "status": {"phase": "Bound"}}, []) is None
    job = {"metadata": {"name": "d-gen", "namespace": "ml"}}
    failed = create_problem(job, [_event("Job", "d-gen", "FailedCreate", 'serviceaccount "x" not found')])
    assert (
        failed is not None and failed[1] == "FailedCreate" and "Job ml/d-gen cannot create pods" in failed[2]
    )
    assert create_problem(job, [_event("Job", "other", "FailedCreate", "")]) is None


def test_finished_stages_are_recorded_before_their_ttl_and_never_created_again() -> None:
    trainer = {
        "kind": "Job",
        "metadata": {"labels": {"app.kubernetes.io/component": "trainer"}},
        "spec": {"ttlSecondsAfterFinished": 60},
    }
    running: Obj = {"conditions": [{"type": "Exported", "status": "False"}]}
    assert "ttlSecondsAfterFinished" not in hold_ttl(trainer, finished_components(running))["spec"]
    assert may_create(trainer, finished_components(running))
    exported: Obj = {"conditions": [{"type": "Exported", "status": "True", "lastTransitionTime": NOW}]}
    assert hold_ttl(trainer, finished_components(exported)) == trainer
    assert not may_create(trainer, finished_components(exported))
    cr = _cr("hass-train.yaml")
    after_ttl = training_status(
        cr, {**exported, "progress": {"step": 9}}, _data(ShardsComplete="True"), Observed(), NOW
    )
    assert _cond(after_ttl, "Exported")["status"] == "True", "the record outlives the Job"
    assert _cond(after_ttl, "Ready")["reason"] == "StartingEvaluation" and after_ttl["artifact"]


def test_waiting_messages_say_what_is_awaited() -> None:
    online = _cr("datagen-online.yaml", 1)
    status = training_status(online, {}, _data("datagen-online.yaml"), Observed(), NOW)
    assert "waiting for the broker" in _cond(status, "Ready")["message"]
    missing = waiting_status(1, {}, "SpeculatorDataGen 'x' not found", NOW, overdue=True)
    assert _cond(missing, "Stalled")["status"] == "True" and _cond(missing, "Failed")["status"] == "False"
    assert _cond(missing, "Ready")["reason"] == "DataGenNotFound"
    edited = stalled_status(2, {}, "ImmutableFieldChanged", "nodes is immutable", NOW, None)
    assert _cond(edited, "Stalled")["status"] == "True" and _cond(edited, "Failed")["status"] == "False"


def test_no_held_out_conversations_skips_evaluation_and_completes() -> None:
    cr = _cr("hass-train.yaml")
    cr.spec.data.validation_fraction = 0.0
    done = training_status(
        cr, {}, _data(ShardsComplete="True"), Observed(job=_job(conditions={"Complete": {}})), NOW
    )
    assert _cond(done, "Complete")["status"] == "True" and done["artifact"]["path"] == "/output/final"
    evaluated = _cond(done, "Evaluated")
    assert evaluated["status"] == "False" and evaluated["reason"] == "NoHeldOutData"
    assert "validationFraction is 0" in evaluated["message"]
