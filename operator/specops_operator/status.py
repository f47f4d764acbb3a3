"""Status from what the children look like now (level-based): handlers fetch, this decides.

Progress comes from Kubernetes objects the operator already reads: Job counters for shards and
nodes, and the pods' termination messages, into which `specops_operator.report` copies each
workload's one-line JSON report. Workload pods need no API credentials at all.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from specops_operator.api import SpeculatorDataGen, SpeculatorTraining
from specops_operator.builders import common
from specops_operator.builders.datagen import GENERATOR, DataGenNames
from specops_operator.builders.training import FINAL_DIR, DataSource, TrainingNames, verifier_of
from specops_operator.conditions import Desired, Phase, find, is_true, lifecycle, merge
from specops_operator.report import parse_report
from specops_operator.validation import FINDING_REASONS

Obj = dict[str, Any]
MESSAGE_LIMIT = 1024


# --------------------------------------------------------------------------- small readers


def parse_ranges(text: str) -> set[int]:
    """`0-3,7` (as in Job.status.completedIndexes) -> {0, 1, 2, 3, 7}."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def format_ranges(indexes: set[int]) -> str:
    parts: list[str] = []
    for i in sorted(indexes):
        if parts and parts[-1].split("-")[-1] == str(i - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


@dataclass(frozen=True)
class JobView:
    """The parts of a Job's status that decide a phase."""

    exists: bool = False
    suspended: bool = False
    active: int = 0
    succeeded: int = 0
    failed_indexes: int = 0
    complete: bool = False
    failed: bool = False
    reason: str = ""
    message: str = ""

    @classmethod
    def of(cls, job: Obj | None) -> JobView:
        if job is None:
            return cls()
        status = job.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        failed = conditions.get("Failed") or {}
        return cls(
            exists=True,
            suspended=bool((job.get("spec") or {}).get("suspend")) or "Suspended" in conditions,
            active=int(status.get("active") or 0),
            succeeded=int(status.get("succeeded") or 0),
            failed_indexes=len(parse_ranges(status.get("failedIndexes") or "")),
            complete="Complete" in conditions,
            failed=bool(failed),
            reason=str(failed.get("reason") or ""),
            message=str(failed.get("message") or ""),
        )


def _container_state(pod: Obj) -> Obj:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == common.CONTAINER:
            return dict((status.get("state") or {}).get("terminated") or {})
    return {}


def _index(pod: Obj) -> int | None:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(common.INDEX_ANNOTATION)
    return int(raw) if raw is not None and str(raw).isdigit() else None


def succeeded_reports(pods: Sequence[Obj]) -> dict[int, Obj]:
    """Completion index -> the report of its succeeded pod."""
    out: dict[int, Obj] = {}
    for pod in pods:
        index = _index(pod)
        if index is None or (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        report = parse_report(str(_container_state(pod).get("message") or ""))
        if report is not None:
            out[index] = report
    return out


def latest_report(pods: Sequence[Obj], index: int = 0) -> Obj | None:
    """The newest report any finished pod of `index` left (rank 0 reports for a trainer)."""
    finished = [
        (
            str(_container_state(p).get("finishedAt") or ""),
            parse_report(str(_container_state(p).get("message") or "")),
        )
        for p in pods
        if _index(p) == index
    ]
    reports = [(when, r) for when, r in finished if r is not None]
    return max(reports, key=lambda item: item[0])[1] if reports else None


def failure_detail(pods: Sequence[Obj]) -> str:
    """What the last failed workload container said (its error line, via FallbackToLogsOnError)."""
    failed = [
        (str(state.get("finishedAt") or ""), str(state.get("message") or "").strip())
        for state in (_container_state(p) for p in pods)
        if state.get("exitCode") not in (None, 0)
    ]
    failed = [item for item in failed if item[1]]
    if not failed:
        return ""
    text = max(failed)[1]
    report = parse_report(text)
    if report is not None and report.get("error"):
        return str(report["error"])[-MESSAGE_LIMIT:]  # the wrapper kept the command's error line
    lines = [line for line in text.splitlines() if "error" in line.lower()] or text.splitlines()
    return lines[-1][-MESSAGE_LIMIT:]


def _failure(job: JobView, pods: Sequence[Obj], fatal_reason: str) -> tuple[str, str]:
    reason = {"PodFailurePolicy": fatal_reason, "BackoffLimitExceeded": "RetriesExhausted"}.get(
        job.reason, job.reason
    )
    detail = failure_detail(pods)
    message = "; ".join(filter(None, [job.message, detail]))[:MESSAGE_LIMIT]
    return reason or "Failed", message or "the Job failed"


# --------------------------------------------------------------------------- data generation


@dataclass(frozen=True)
class Observed:
    """Children of one resource as read from the API server."""

    job: Obj | None = None
    broker: Obj | None = None
    pods: tuple[Obj, ...] = ()
    eval_job: Obj | None = None
    eval_pods: tuple[Obj, ...] = ()


def _datagen_progress(cr: SpeculatorDataGen, job: JobView, pods: Sequence[Obj], prior: Obj) -> Obj:
    before = dict(prior.get("progress") or {})
    counted = parse_ranges(str(before.get("countedIndexes") or ""))
    examples = int(before.get("examples") or 0)
    tokens = int(before.get("tokens") or 0)
    seconds = float(before.get("generatorSeconds") or 0.0)
    for index, report in sorted(succeeded_reports(pods).items()):
        if index in counted:
            continue
        counted.add(index)
        examples += int(report.get("written") or 0) + int(report.get("skipped") or 0)
        tokens += int(report.get("tokens") or 0)
        seconds += float(report.get("seconds") or 0.0)
    total = cr.spec.shards
    return {
        "shards": f"{job.succeeded}/{total}",
        "shardsDone": job.succeeded,
        "shardsTotal": total,
        "shardsFailed": job.failed_indexes,
        "examples": examples,
        "tokens": tokens,
        "generatorSeconds": round(seconds, 3),
        "tokensPerSecond": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "countedIndexes": format_ranges(counted),
    }


def _datagen_phase(
    cr: SpeculatorDataGen, job: JobView, pods: Sequence[Obj], queued: bool
) -> tuple[Phase, str, str]:
    shards = f"{job.succeeded}/{cr.spec.shards} shards"
    if job.failed:
        reason, message = _failure(job, pods, "ConfigError")
        return Phase.FAILED, reason, message
    if job.complete:
        return Phase.COMPLETE, "Complete", f"{shards} generated"
    if cr.spec.suspend:
        return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
    if not job.exists:
        return Phase.PENDING, "Creating", "creating the generator Job"
    if job.suspended:
        waiting = "its Kueue queue admits it" if queued else "it is resumed"
        return Phase.PENDING, "WaitingForAdmission", f"the generator Job is suspended until {waiting}"
    if job.active:
        return Phase.RUNNING, "Generating", f"{shards}, {job.active} pods running"
    return Phase.PENDING, "Starting", f"{shards}, waiting for generator pods"


def datagen_status(
    cr: SpeculatorDataGen, prior: Obj, seen: Observed, now: str, compatible: Desired | None = None
) -> Obj:
    """The whole status of a SpeculatorDataGen given its children."""
    meta = cr.metadata
    assert meta.namespace is not None
    names = DataGenNames(meta.name, meta.namespace)
    job = JobView.of(seen.job)
    phase, reason, message = _datagen_phase(
        cr, job, seen.pods, bool(meta.labels.get(common.KUEUE_QUEUE_LABEL))
    )
    desired = lifecycle(phase, reason, message)
    extra: Obj = {}
    if cr.spec.mode == "offline":
        done = job.complete or job.succeeded >= cr.spec.shards
        desired.append(
            Desired(
                "ShardsComplete",
                done,
                "AllShardsDone" if done else ("ShardsFailed" if job.failed_indexes else "InProgress"),
                f"{job.succeeded}/{cr.spec.shards} shards, {job.failed_indexes} failed",
            )
        )
        extra = {"claimName": names.claim_for(cr.spec), "dataPath": common.SHARDS_DIR}
    else:
        ready = int(((seen.broker or {}).get("status") or {}).get("readyReplicas") or 0) > 0
        url = names.broker_url(cr.spec)
        desired.append(
            Desired(
                "StreamConnected", ready, "BrokerReady" if ready else "BrokerNotReady", f"broker at {url}"
            )
        )
        extra = {"brokerUrl": url}
    if compatible is not None:
        desired.append(compatible)
    generation = meta.generation or 0
    selector = common.label_selector(common.selector_labels(common.Owner.of(cr), GENERATOR))
    return {
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
        "progress": _datagen_progress(cr, job, seen.pods, prior),
        "workers": job.active,
        "selector": selector,
        **extra,
    }


# --------------------------------------------------------------------------- training


def vllm_serve_command(verifier: str, speculator_dir: str, algorithm: str, speculative_tokens: int) -> str:
    """The exact command that serves the verifier with this speculator (both algorithms load as eagle3)."""
    del algorithm  # HASS drafts are saved as eagle3 models; vLLM's method is eagle3 for both
    config = {"method": "eagle3", "model": speculator_dir, "num_speculative_tokens": speculative_tokens}
    return f"vllm serve {shlex.quote(verifier)} --speculative-config {shlex.quote(json.dumps(config))}"


def artifact(cr: SpeculatorTraining, data: DataSource) -> Obj:
    spec = cr.spec
    assert cr.metadata.namespace is not None
    names = TrainingNames(cr.metadata.name, cr.metadata.namespace)
    verifier = verifier_of(spec, data).name_or_path
    return {
        "claimName": names.claim_for(spec),
        "path": FINAL_DIR,
        "verifier": verifier,
        "algorithm": spec.draft.algorithm,
        "speculativeTokens": spec.draft.speculative_tokens,
        "vllmServeCommand": vllm_serve_command(
            verifier, FINAL_DIR, spec.draft.algorithm, spec.draft.speculative_tokens
        ),
    }


def _evaluation_skipped(cr: SpeculatorTraining, data: DataSource) -> str | None:
    if not cr.spec.evaluation.enabled:
        return "Disabled"
    if data.spec.mode != "offline":
        return "NoPromptData"
    return None


def _training_phase(
    cr: SpeculatorTraining, data: DataSource, trainer: JobView, evaluator: JobView, seen: Observed
) -> tuple[Phase, str, str]:
    spec = cr.spec
    if not data.found:
        return Phase.PENDING, "WaitingForData", f"SpeculatorDataGen {data.names.name!r} not found"
    if trainer.failed:
        reason, message = _failure(trainer, seen.pods, "ConfigError")
        return Phase.FAILED, reason, message
    if not trainer.exists and data.failed:
        return Phase.FAILED, "DataGenFailed", f"SpeculatorDataGen {data.names.name!r} failed"
    if trainer.complete:
        if _evaluation_skipped(cr, data) is not None or evaluator.complete:
            return Phase.COMPLETE, "Complete", f"speculator exported to {FINAL_DIR}"
        if evaluator.failed:
            reason, message = _failure(evaluator, seen.eval_pods, "EvaluationFailed")
            return Phase.FAILED, "EvaluationFailed", message
        if spec.suspend:
            return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
        if evaluator.active:
            return Phase.RUNNING, "Evaluating", "measuring acceptance length"
        return Phase.PENDING, "StartingEvaluation", "waiting for the evaluation pod"
    if spec.suspend:
        return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
    if not trainer.exists:
        if not data.ready:
            progress = (data.status.get("progress") or {}).get("shards") or "not started"
            return Phase.PENDING, "WaitingForData", f"SpeculatorDataGen {data.names.name!r}: {progress}"
        return Phase.PENDING, "Creating", "creating the trainer Job"
    if trainer.suspended:
        return Phase.PENDING, "WaitingForAdmission", "the trainer Job is suspended until it is admitted"
    if trainer.active:
        return Phase.RUNNING, "Training", f"{trainer.active}/{spec.nodes} trainer pods running"
    return Phase.PENDING, "Starting", "waiting for trainer pods"


def _evaluated(cr: SpeculatorTraining, data: DataSource, evaluator: JobView, result: Obj | None) -> Desired:
    skipped = _evaluation_skipped(cr, data)
    if skipped is not None:
        return Desired(
            "Evaluated",
            False,
            skipped,
            "evaluation is off" if skipped == "Disabled" else "no prompts on disk",
        )
    if evaluator.complete and result is not None:
        return Desired("Evaluated", True, "Evaluated", f"acceptance length {result['acceptanceLength']:.3f}")
    if evaluator.failed:
        return Desired(
            "Evaluated", False, "EvaluationFailed", evaluator.message or "the evaluation Job failed"
        )
    return Desired("Evaluated", False, "NotEvaluated", "runs after training")


def _evaluation_result(seen: Observed) -> Obj | None:
    report = latest_report(seen.eval_pods)
    if report is None or "acceptance_length" not in report:
        return None
    return {
        "acceptanceLength": float(report["acceptance_length"]),
        "perPosition": [float(x) for x in report.get("per_position") or []][:64],
        "lossless": bool(report.get("lossless", True)),
        "prompts": int(report.get("prompts") or 0),
    }


def training_status(
    cr: SpeculatorTraining,
    prior: Obj,
    data: DataSource,
    seen: Observed,
    now: str,
    compatible: Desired | None = None,
) -> Obj:
    """The whole status of a SpeculatorTraining given its data source and children."""
    trainer = JobView.of(seen.job)
    evaluator = JobView.of(seen.eval_job)
    phase, reason, message = _training_phase(cr, data, trainer, evaluator, seen)
    result = _evaluation_result(seen) or prior.get("evaluation")
    desired = lifecycle(phase, reason, message)
    desired.append(
        Desired(
            "Exported",
            trainer.complete,
            "Exported" if trainer.complete else "NotTrained",
            f"speculator in {FINAL_DIR}" if trainer.complete else "exported when training completes",
        )
    )
    desired.append(_evaluated(cr, data, evaluator, result))
    if compatible is not None:
        desired.append(compatible)
    report = latest_report(seen.pods) or {}
    before = dict(prior.get("progress") or {})
    progress: Obj = {
        "step": max(int(report.get("step") or 0), int(before.get("step") or 0)),
        "nodesActive": trainer.active,
    }
    best = report.get("best_val_loss", before.get("bestValLoss"))
    if best is not None:
        progress["bestValLoss"] = float(best)
    generation = cr.metadata.generation or 0
    out: Obj = {
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
        "progress": progress,
        "dataGen": data.names.name,
        "verifier": verifier_of(cr.spec, data).name_or_path,
    }
    if result is not None:
        out["evaluation"] = result
    if trainer.complete:
        out["artifact"] = artifact(cr, data)
    return out


STALL_REASONS = frozenset({"InvalidSpec", "ImmutableFieldChanged", "ChildConflict"}) | FINDING_REASONS
"""Failed because of the spec, not the workload: re-checked on every refresh (a fix unblocks it)."""


def is_terminal(status: Obj) -> bool:
    """The run finished (Complete, or Failed in its workload): nothing may be re-created."""
    conditions = status.get("conditions") or []
    failed = find(conditions, "Failed") or {}
    return is_true(conditions, "Complete") or (
        failed.get("status") == "True" and failed.get("reason") not in STALL_REASONS
    )


def settled_status(generation: int, prior: Obj) -> Obj:
    """A finished run's status with only the generation moved on (mutable knobs changed after the end)."""
    conditions = [{**c, "observedGeneration": generation} for c in prior.get("conditions") or []]
    return {**prior, "observedGeneration": generation, "conditions": conditions}


def waiting_status(generation: int, prior: Obj, message: str, now: str) -> Obj:
    """Nothing can be created yet (the referenced SpeculatorDataGen does not exist)."""
    desired = lifecycle(Phase.PENDING, "WaitingForData", message)
    return {
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
    }


def stalled_status(
    generation: int, prior: Obj, reason: str, message: str, now: str, domain: str | None
) -> Obj:
    """Status of a spec that cannot run: Stalled, Failed, and the failing domain condition."""
    desired = lifecycle(Phase.STALLED, reason, message)
    if domain is not None:
        desired.append(Desired(domain, False, reason, message))
    return {
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
    }


def compatible_condition(findings: Sequence[Any], checked: bool) -> Desired:
    """VerifierCompatible from validation findings (`checked` = the verifier dimensions were known)."""
    if findings:
        return Desired(
            "VerifierCompatible", False, findings[0].reason, "; ".join(f.message for f in findings)
        )
    if not checked:
        return Desired(
            "VerifierCompatible",
            None,
            "ArchitectureUnknown",
            "verifier dimensions unknown; set spec.verifierArchitecture to check layers and vocabulary",
        )
    return Desired("VerifierCompatible", True, "Compatible", "layers, vocabulary, GPUs and storage checked")
