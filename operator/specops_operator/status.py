"""Status from what the children look like now (level-based): handlers fetch, this decides.

Progress comes from Kubernetes objects the operator already reads: Job counters for shards and
nodes, and the pods' termination messages, into which `specops_operator.report` copies each
workload's one-line JSON report. Workload pods need no API credentials at all.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from specops import exitcodes
from specops.plan import human
from specops_operator.api import SpeculatorDataGen, SpeculatorTraining
from specops_operator.builders import common
from specops_operator.builders.datagen import GENERATOR, DataGenNames
from specops_operator.builders.modelcache import FETCHER, CacheNames
from specops_operator.builders.publish import PUBLISHER
from specops_operator.builders.training import (
    EVALUATOR,
    FINAL_DIR,
    TRAINER,
    DataSource,
    TrainingNames,
    evaluation_skipped,
    verifier_of,
)
from specops_operator.conditions import Desired, Phase, find, is_true, lifecycle, merge
from specops_operator.jobs import NO_JOB, JobView, format_ranges, parse_ranges
from specops_operator.progress import ANSWER_FIELDS, GENERATION_FIELDS, eta_text
from specops_operator.report import parse_report
from specops_operator.uploads import UploadStep, evaluated_after_run
from specops_operator.validation import FINDING_REASONS

Obj = dict[str, Any]
MESSAGE_LIMIT = 1024
DATA = "data"
"""Component label of a training's inline SpeculatorDataGen (`builders.training.child_datagen`)."""
STAGE_KINDS = frozenset({"Job", "SpeculatorDataGen"})
"""Children that do work: a finished one is never created again."""


# --------------------------------------------------------------------------- small readers


def container_state(pod: Obj) -> Obj:
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
        report = parse_report(str(container_state(pod).get("message") or ""))
        if report is not None:
            out[index] = report
    return out


def latest_report(pods: Sequence[Obj], index: int = 0) -> Obj | None:
    """The newest report any finished pod of `index` left (rank 0 reports for a trainer)."""
    finished = [
        (
            str(container_state(p).get("finishedAt") or ""),
            parse_report(str(container_state(p).get("message") or "")),
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
        for state in (container_state(p) for p in pods)
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


# --------------------------------------------------------------------------- what the cluster says

NOT_STARTING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
)
"""Container waiting reasons that do not go away by themselves."""


def _live(pods: Sequence[Obj]) -> list[Obj]:
    return [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") in ("Pending", "Running")
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]


def running_pods(job: JobView, pods: Sequence[Obj]) -> int:
    """Pods really running. Job.status.active counts Pending pods too, so it is not the answer;
    without the pods, only the Ready count is trusted."""
    live = _live(pods)
    if live:
        return sum(1 for p in live if (p.get("status") or {}).get("phase") == "Running")
    return min(job.active, job.ready or 0)


def looks_stuck(job: JobView, pods: Sequence[Obj]) -> bool:
    """The Job should be running pods and runs none: worth reading its (and its claim's) Events."""
    busy = job.complete or job.failed or job.suspended
    return job.exists and not busy and running_pods(job, pods) == 0


def pending_detail(pods: Sequence[Obj]) -> tuple[str, str] | None:
    """(reason, message) naming a Pending pod and why it does not start: the scheduler's
    Unschedulable message, or a container stuck waiting (image pull, missing Secret)."""
    for pod in _live(pods):
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        name = (pod.get("metadata") or {}).get("name", "")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {name}: {cond.get('message') or 'unschedulable'}"
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in NOT_STARTING:
                return "PodsNotStarting", f"pod {name}: {waiting['reason']}: {waiting.get('message') or ''}"
    return None


def _warnings(
    events: Sequence[Obj], kind: str, name: str, reasons: frozenset[str] | None = None
) -> list[str]:
    about = [
        e
        for e in events
        if e.get("type") == "Warning"
        and (e.get("involvedObject") or {}).get("kind") == kind
        and (e.get("involvedObject") or {}).get("name") == name
        and (reasons is None or e.get("reason") in reasons)
    ]
    about.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return [str(e.get("message") or e.get("reason") or "") for e in about]


def claim_problem(claim: Obj | None, events: Sequence[Obj]) -> tuple[Phase, str, str] | None:
    """A data/output PVC that is not bound: Blocked when provisioning reported a Warning (no such
    storage class, no RWX support), else still Pending (e.g. bound when the first pod schedules)."""
    if claim is None or (claim.get("status") or {}).get("phase") != "Pending":
        return None
    meta = claim.get("metadata") or {}
    what = f"PersistentVolumeClaim {meta.get('namespace')}/{meta.get('name')} is Pending"
    warnings = _warnings(events, "PersistentVolumeClaim", str(meta.get("name")))
    if warnings:
        return Phase.BLOCKED, "StorageNotBound", f"{what}: {warnings[-1]}"[:MESSAGE_LIMIT]
    return Phase.PENDING, "WaitingForStorage", f"{what} (not bound yet)"


def create_problem(job: Obj | None, events: Sequence[Obj]) -> tuple[Phase, str, str] | None:
    """The Job controller cannot create pods (a missing service account, quota, admission): Blocked
    with its FailedCreate message; it retries by itself, so a fix unblocks the run."""
    if job is None:
        return None
    meta = job.get("metadata") or {}
    warnings = _warnings(events, "Job", str(meta.get("name")), frozenset({"FailedCreate"}))
    if not warnings:
        return None
    message = f"Job {meta.get('namespace')}/{meta.get('name')} cannot create pods: {warnings[-1]}"
    return Phase.BLOCKED, "FailedCreate", message[:MESSAGE_LIMIT]


def started_phase(
    what: str,
    job: Obj | None,
    seen: Observed,
    pods: Sequence[Obj],
    reasons: tuple[str, str],
    progress: str = "",
) -> tuple[Phase, str, str]:
    """The phase of a stage whose Job exists, is not suspended and has not finished: running only
    when pods run, else the most telling reason it does not (pod creation, storage, scheduling).
    `reasons`: Ready's reason while running and while starting."""
    view = JobView.of(job)
    count = running_pods(view, pods)
    detail = pending_detail(pods)
    if count:
        pending = (
            f"; {view.active - count} not running ({detail[1]})" if detail and view.active > count else ""
        )
        return Phase.RUNNING, reasons[0], f"{progress}{count} {what} pods running{pending}"[:MESSAGE_LIMIT]
    for problem in (create_problem(job, seen.events), claim_problem(seen.claim, seen.events)):
        if problem is not None:
            return problem
    if detail is not None:
        return Phase.PENDING, detail[0], detail[1][:MESSAGE_LIMIT]
    pending = f"{view.active} {what} pods Pending" if view.active else f"waiting for {what} pods"
    return Phase.PENDING, reasons[1], f"{progress}{pending}"


# --------------------------------------------------------------------------- what was observed


@dataclass(frozen=True)
class Group:
    """What the trainer group does now."""

    restarts: int = 0
    """Group restarts recorded (status.trainer.restarts): the attempt to run."""
    last_failure: Obj | None = None
    """status.trainer.lastFailure."""
    attempt: int | None = 0
    """The trainer Job to keep or create; None while a failed attempt is being torn down."""
    teardown: bool = False
    """Delete the trainer Job now (a failed attempt whose restart status has recorded)."""
    exhausted: bool = False
    """Failed: the last attempt failed with no restart left."""
    fatal_code: int | None = None
    """Failed: a rank exited with a code no restart can change."""

    @property
    def restarting(self) -> bool:
        return self.attempt is None

    def status(self) -> Obj:
        out: Obj = {"restarts": self.restarts}
        if self.last_failure is not None:
            out["lastFailure"] = self.last_failure
        return out


FATAL_REASONS = {
    exitcodes.CONFIG: "ConfigError",
    exitcodes.DATA: "DataError",
    exitcodes.NOT_BETTER: "NotBetter",
}
"""Failed's reason for a trainer exit code no restart can change."""


def describe(failure: Obj | None) -> str:
    """`pod x (rank 1) exit code 137 (Error): ...` for messages and Events."""
    if not failure:
        return "unknown cause"
    parts = []
    if failure.get("pod"):
        rank = f" (rank {failure['rank']})" if failure.get("rank") is not None else ""
        parts.append(f"pod {failure['pod']}{rank}")
    if failure.get("exitCode") is not None:
        parts.append(f"exit code {failure['exitCode']}")
    head = " ".join(parts) or "the trainer Job"
    text = f"{head} ({failure.get('reason') or 'Failed'})"
    return f"{text}: {failure['message']}" if failure.get("message") else text


@dataclass(frozen=True)
class Observed:
    """Children of one resource as read from the API server."""

    job: Obj | None = None
    broker: Obj | None = None
    pods: tuple[Obj, ...] = ()
    """Pods of the generator or trainer (read when reports are due or some may not run)."""
    eval_job: Obj | None = None
    eval_pods: tuple[Obj, ...] = ()
    publish_job: Obj | None = None
    """The `spec.export` upload Job."""
    publish_pods: tuple[Obj, ...] = ()
    upload: UploadStep = field(default_factory=UploadStep)
    """What was done with the upload Job (`uploads.decide`): the key to record, why it is replaced."""
    claim: Obj | None = None
    """The PVC the running stage writes (data or output)."""
    events: tuple[Obj, ...] = ()
    """Events about the Job and the claim (read only while they look stuck)."""
    fetch: Observed | None = None
    """The `modelCache` download stage (its Job, pods, claim and Events), when this run has one."""
    group: Group = Group()
    """The trainer group's restarts (`restarts.decide`)."""
    live: dict[str, float] = field(default_factory=dict)
    """Progress metrics read while the stage runs (`specops_operator.progress`): rank 0's for a
    training, the running generators' summed for a DataGen."""


# --------------------------------------------------------------------------- model cache

CACHED = "ModelCached"
"""Domain condition: the run's `modelCache` holds the verifier (present only with a model cache)."""


def model_cached(fetch: Observed, prior: Obj, verifier: str, claim: str) -> Desired:
    """Whether the download Job filled the cache: Downloaded (with what its report says),
    DownloadingModel, or DownloadFailed with the pod's error line (refused token, no such model or
    revision; an unreachable Hub only after the Job's retries)."""
    before = find(prior.get("conditions") or [], CACHED) or {}
    if before.get("status") == "True":
        return Desired(CACHED, True, "Downloaded", str(before.get("message") or ""))
    view = JobView.of(fetch.job)
    if view.complete:
        report = latest_report(fetch.pods) or {}
        at = f" at {str(report['revision'])[:12]}" if report.get("revision") else ""
        size = f": {report.get('files')} files, {human(int(report['bytes']))}" if "bytes" in report else ""
        return Desired(CACHED, True, "Downloaded", f"{verifier}{at} in claim {claim}{size}")
    if view.failed:
        return Desired(CACHED, False, "DownloadFailed", _failure(view, fetch.pods, "DownloadFailed")[1])
    return Desired(CACHED, False, "DownloadingModel", f"downloading {verifier} into claim {claim}")


def _waiting_download(cached: Desired) -> tuple[Phase, str, str] | None:
    """The phase while another resource (the inline child DataGen) fills the cache."""
    if cached.status:
        return None
    return (
        (Phase.FAILED if cached.reason == "DownloadFailed" else Phase.PENDING),
        cached.reason,
        cached.message,
    )


def download_phase(fetch: Observed, cached: Desired) -> tuple[Phase, str, str] | None:
    """The phase while the model cache is not filled yet (None once it is): no generator or
    trainer pod exists before, so this is what the run is doing."""
    if cached.status:
        return None
    if cached.reason == "DownloadFailed":
        return Phase.FAILED, "DownloadFailed", cached.message
    view = JobView.of(fetch.job)
    if view.exists and not view.suspended:
        reasons = ("DownloadingModel", "DownloadingModel")
        return started_phase("download", fetch.job, fetch, fetch.pods, reasons, f"{cached.message}: ")
    return Phase.PENDING, "DownloadingModel", cached.message


# --------------------------------------------------------------------------- data generation


LIVE_DATAGEN_COUNTS = (*GENERATION_FIELDS.values(), *ANSWER_FIELDS.values(), "etaSeconds")
"""The integer `status.progress` fields `progress.read_generation` sums from the generators."""
LIVE_DATAGEN = (*LIVE_DATAGEN_COUNTS, "eta", "updatedAt")
"""`status.progress` fields read from the running generators (kept while none answers)."""


def _datagen_progress(cr: SpeculatorDataGen, job: JobView, seen: Observed, prior: Obj, now: str) -> Obj:
    pods = seen.pods
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
    live = {k: before[k] for k in LIVE_DATAGEN if k in before}
    live.update(_live_fields(seen.live, now, LIVE_DATAGEN_COUNTS))
    if job.complete and "etaSeconds" in live:
        live.update(etaSeconds=0, eta=eta_text(0))
    return {
        **live,
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
    cr: SpeculatorDataGen, job: JobView, seen: Observed, queued: bool, cached: Desired | None
) -> tuple[Phase, str, str]:
    shards = f"{job.succeeded}/{cr.spec.shards} shards"
    if job.failed:
        reason, message = _failure(job, seen.pods, "ConfigError")
        return Phase.FAILED, reason, message
    if job.complete:
        return Phase.COMPLETE, "Complete", f"{shards} generated"
    downloading = download_phase(seen.fetch, cached) if seen.fetch and cached else None
    if downloading and downloading[0] == Phase.FAILED:
        return downloading
    if cr.spec.suspend:
        return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
    if downloading:
        return downloading
    if not job.exists:
        return Phase.PENDING, "Creating", "creating the generator Job"
    if job.suspended:
        waiting = "its Kueue queue admits it" if queued else "it is resumed"
        return Phase.PENDING, "WaitingForAdmission", f"the generator Job is suspended until {waiting}"
    return started_phase("generator", seen.job, seen, seen.pods, ("Generating", "Starting"), f"{shards}, ")


def datagen_status(
    cr: SpeculatorDataGen, prior: Obj, seen: Observed, now: str, compatible: Desired | None = None
) -> Obj:
    """The whole status of a SpeculatorDataGen given its children."""
    meta = cr.metadata
    assert meta.namespace is not None
    names = DataGenNames(meta.name, meta.namespace)
    job = JobView.of(seen.job)
    cached = None
    if cr.spec.model_cache is not None and seen.fetch is not None:
        claim = CacheNames.of(cr.kind, meta.name).claim_for(cr.spec.model_cache)
        cached = model_cached(seen.fetch, prior, cr.spec.verifier.name_or_path, claim)
    queued = bool(meta.labels.get(common.KUEUE_QUEUE_LABEL))
    phase, reason, message = _datagen_phase(cr, job, seen, queued, cached)
    desired = lifecycle(phase, reason, message)
    if cached is not None:
        desired.append(cached)
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
        "progress": _datagen_progress(cr, job, seen, prior, now),
        "workers": running_pods(job, seen.pods),
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


SKIPPED_MESSAGES = {
    "Disabled": "evaluation is off",
    "NoPromptData": "no prompts on disk",
    "NoHeldOutData": "spec.data.validationFraction is 0: no conversation was held out of training",
}


def _training_cached(cr: SpeculatorTraining, data: DataSource, seen: Observed, prior: Obj) -> Desired | None:
    """ModelCached of a training: its own download's, or the inline child DataGen's (which
    downloads for generators, trainer and evaluator alike)."""
    if cr.spec.model_cache is None:
        return None
    verifier = verifier_of(cr.spec, data).name_or_path
    if seen.fetch is not None:
        claim = CacheNames.of(cr.kind, cr.metadata.name).claim_for(cr.spec.model_cache)
        return model_cached(seen.fetch, prior, verifier, claim)
    child = find(data.conditions, CACHED)
    if child is None:
        return Desired(
            CACHED, False, "DownloadingModel", f"SpeculatorDataGen {data.names.name!r} downloads {verifier}"
        )
    return Desired(
        CACHED, child.get("status") == "True", str(child.get("reason")), str(child.get("message") or "")
    )


def export_target(cr: SpeculatorTraining) -> str:
    """The Hub repository or object-store prefix `spec.export` names, for messages."""
    export = cr.spec.export
    assert export is not None
    return export.hub.repo if export.hub is not None else str(export.uri)


def _upload_phase(cr: SpeculatorTraining, publisher: JobView, seen: Observed) -> tuple[Phase, str, str] | str:
    """While the upload runs, its phase; once it ended, the note the Complete message carries
    (a failed upload leaves the run Complete: the artifact stands on the claim, Published says why)."""
    if publisher.complete:
        return f"; uploaded to {export_target(cr)}"
    if publisher.failed:
        return f"; upload failed: {_failure(publisher, seen.publish_pods, 'UploadFailed')[1]}"
    if cr.spec.suspend:
        return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
    if publisher.exists and not publisher.suspended:
        return started_phase(
            "upload", seen.publish_job, seen, seen.publish_pods, ("Uploading", "StartingUpload")
        )
    return Phase.PENDING, "StartingUpload", f"waiting for the upload Job ({export_target(cr)})"


def _published(
    cr: SpeculatorTraining,
    trainer: JobView,
    evaluator: JobView,
    publisher: JobView,
    seen: Observed,
    artifact_url: str | None,
) -> Desired:
    """Published (only with `spec.export`): Uploaded with the URL, UploadFailed with the pod's error
    line, EvaluationFailed (a draft whose evaluation failed is not uploaded), or not yet."""
    target = export_target(cr)
    note = seen.upload.note
    if note and (not publisher.exists or not (publisher.complete or publisher.failed)):
        return Desired("Published", False, "Uploading", f"{note}; uploads to {target}")
    if publisher.complete:
        return Desired("Published", True, "Uploaded", f"uploaded to {artifact_url or target}")
    if publisher.failed:
        return Desired(
            "Published", False, "UploadFailed", _failure(publisher, seen.publish_pods, "UploadFailed")[1]
        )
    if evaluator.failed and not evaluator.complete:
        message = f"not uploaded to {target}: the evaluation failed (check the draft, then `specops push` it)"
        return Desired("Published", False, "EvaluationFailed", message)
    if not trainer.complete:
        return Desired("Published", False, "NotTrained", f"uploads to {target} once trained and evaluated")
    if not publisher.exists:
        return Desired(
            "Published", False, "NotEvaluated", f"uploads to {target} once the evaluation succeeded"
        )
    return Desired("Published", False, "Uploading", f"uploading to {target}")


def _trained_phase(
    cr: SpeculatorTraining, data: DataSource, evaluator: JobView, publisher: JobView, seen: Observed
) -> tuple[Phase, str, str]:
    """After training: the evaluation, then (with `spec.export`) the upload, then Complete."""
    spec = cr.spec
    done = f"speculator exported to {FINAL_DIR}"
    if evaluation_skipped(spec, data) is None and not evaluator.complete:
        if evaluator.failed:  # the artifact stands; Evaluated=False says why (and it is not uploaded)
            _, message = _failure(evaluator, seen.eval_pods, "EvaluationFailed")
            return Phase.COMPLETE, "Complete", f"{done}; evaluation failed: {message}"[:MESSAGE_LIMIT]
        if spec.suspend:
            return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
        if evaluator.exists and not evaluator.suspended:
            return started_phase(
                "evaluation", seen.eval_job, seen, seen.eval_pods, ("Evaluating", "StartingEvaluation")
            )
        return Phase.PENDING, "StartingEvaluation", "waiting for the evaluation Job"
    if spec.export is None:
        return Phase.COMPLETE, "Complete", done
    uploading = _upload_phase(cr, publisher, seen)
    if isinstance(uploading, tuple):
        return uploading
    return Phase.COMPLETE, "Complete", f"{done}{uploading}"[:MESSAGE_LIMIT]


def _training_phase(
    cr: SpeculatorTraining,
    data: DataSource,
    trainer: JobView,
    evaluator: JobView,
    seen: Observed,
    cached: Desired | None,
    publisher: JobView = NO_JOB,
) -> tuple[Phase, str, str]:
    spec = cr.spec
    group = seen.group
    if not data.found:  # the inline child, created by this very reconcile
        return Phase.PENDING, "WaitingForData", f"creating SpeculatorDataGen {data.names.name!r}"
    if group.exhausted:
        limit = spec.trainer.max_restarts
        message = (
            f"the trainer group failed after {group.restarts} of {limit} restarts (spec.trainer.maxRestarts)"
        )
        return (
            Phase.FAILED,
            "RestartsExhausted",
            f"{message}; last cause: {describe(group.last_failure)}"[:MESSAGE_LIMIT],
        )
    if group.restarting:
        after = describe(group.last_failure) if group.last_failure else "its Job was deleted"
        message = (
            f"replacing the trainer group (restart {group.restarts} of {spec.trainer.max_restarts}) after "
            f"{after}; every rank resumes from the newest checkpoint"
        )
        return Phase.PENDING, "Restarting", message[:MESSAGE_LIMIT]
    if trainer.failed:
        reason, message = _failure(trainer, seen.pods, "ConfigError")
        return Phase.FAILED, FATAL_REASONS.get(group.fatal_code or 0, reason), message
    if not trainer.exists and data.failed:
        failed = find(data.conditions, "Failed") or {}
        cause = f": {failed.get('reason')}: {failed.get('message')}" if failed.get("message") else ""
        message = f"SpeculatorDataGen {data.names.name!r} failed{cause}"
        return Phase.FAILED, "DataGenFailed", message[:MESSAGE_LIMIT]
    downloading = None
    if cached is not None and not trainer.exists:
        downloading = download_phase(seen.fetch, cached) if seen.fetch else _waiting_download(cached)
    if downloading and downloading[0] == Phase.FAILED:
        return downloading
    if trainer.complete:
        return _trained_phase(cr, data, evaluator, publisher, seen)
    if spec.suspend:
        return Phase.SUSPENDED, "Suspended", "spec.suspend is true"
    if downloading:
        return downloading
    if not trainer.exists:
        if not data.ready:
            if data.spec.mode != "offline":
                return (
                    Phase.PENDING,
                    "WaitingForData",
                    f"waiting for the broker of SpeculatorDataGen {data.names.name!r} to accept consumers",
                )
            shards = (data.status.get("progress") or {}).get("shards")
            done = f"{shards} shards generated" if shards else "generation not started"
            return Phase.PENDING, "WaitingForData", f"SpeculatorDataGen {data.names.name!r}: {done}"
        return Phase.PENDING, "Creating", "creating the trainer Job"
    if trainer.suspended:
        return Phase.PENDING, "WaitingForAdmission", "the trainer Job is suspended until it is admitted"
    return started_phase(
        "trainer", seen.job, seen, seen.pods, ("Training", "Starting"), f"{spec.nodes} nodes: "
    )


def _evaluated(
    cr: SpeculatorTraining, data: DataSource, evaluator: JobView, result: Obj | None, seen: Observed
) -> Desired:
    skipped = evaluation_skipped(cr.spec, data)
    if skipped is not None:
        return Desired("Evaluated", False, skipped, SKIPPED_MESSAGES[skipped])
    if evaluator.complete and result is not None:
        return Desired("Evaluated", True, "Evaluated", f"acceptance length {result['acceptanceLength']:.3f}")
    if evaluator.failed:
        _, message = _failure(evaluator, seen.eval_pods, "EvaluationFailed")
        verdict = any(container_state(p).get("exitCode") == exitcodes.NOT_BETTER for p in seen.eval_pods)
        return Desired("Evaluated", False, "NotLossless" if verdict else "EvaluationFailed", message)
    return Desired("Evaluated", False, "NotEvaluated", "runs after training")


def _evaluation_result(seen: Observed) -> Obj | None:
    report = latest_report(seen.eval_pods)
    if report is None or "acceptance_length" not in report:
        return None
    result: Obj = {
        "acceptanceLength": float(report["acceptance_length"]),
        "perPosition": [float(x) for x in report.get("per_position") or []][:64],
        "lossless": bool(report.get("lossless", True)),
        "mismatchRate": float(report.get("mismatch_rate") or 0.0),
        "prompts": int(report.get("prompts") or 0),
    }
    source = report.get("source") or {}
    if source.get("held_out") and source.get("conversations") is not None:
        result["heldOutConversations"] = int(source["conversations"])
    return result


def training_status(
    cr: SpeculatorTraining,
    prior: Obj,
    data: DataSource,
    seen: Observed,
    now: str,
    compatible: Desired | None = None,
) -> Obj:
    """The whole status of a SpeculatorTraining given its data source and children."""
    trainer, evaluator = JobView.of(seen.job), JobView.of(seen.eval_job)
    finished = finished_components(prior)
    if TRAINER in finished and not trainer.complete:  # recorded; the TTL may have removed the Job
        trainer = JobView(exists=True, complete=True)
    if EVALUATOR in finished and not evaluator.complete:
        evaluator = JobView(exists=True, complete=True)
    publisher = JobView.of(seen.publish_job)
    if PUBLISHER in finished and not publisher.complete:
        publisher = JobView(exists=True, complete=True)
    cached = _training_cached(cr, data, seen, prior)
    phase, reason, message = _training_phase(cr, data, trainer, evaluator, seen, cached, publisher)
    result = _evaluation_result(seen) or prior.get("evaluation")
    desired = lifecycle(phase, reason, message)
    if cached is not None:
        desired.append(cached)
    desired.append(
        Desired(
            "Exported",
            trainer.complete,
            "Exported" if trainer.complete else "NotTrained",
            f"speculator in {FINAL_DIR}" if trainer.complete else "exported when training completes",
        )
    )
    desired.append(_evaluated(cr, data, evaluator, result, seen))
    uploaded = _uploaded(seen, prior)
    published = _publish_condition(cr, trainer, evaluator, publisher, seen, uploaded, prior)
    if published is not None:
        desired.append(published)
    if compatible is not None:
        desired.append(compatible)
    report = latest_report(seen.pods) or {}
    before = dict(prior.get("progress") or {})
    live = _live_fields(seen.live, now, ("totalSteps", "etaSeconds"), ("loss", "tokensPerSecond"))
    progress: Obj = {**before, **live}
    progress["step"] = max(
        int(report.get("step") or 0), int(seen.live.get("step") or 0), int(before.get("step") or 0)
    )
    progress["nodesActive"] = running_pods(trainer, seen.pods)
    if trainer.complete and "etaSeconds" in progress:
        progress.update(etaSeconds=0, eta=eta_text(0))
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
        "trainer": seen.group.status(),
    }
    if result is not None:
        out["evaluation"] = result
    if trainer.complete:
        out["artifact"] = {**artifact(cr, data), **uploaded}
    return out | _upload_record(seen, prior)


def _upload_record(seen: Observed, prior: Obj) -> Obj:
    """`status.upload` for the key Published describes (null once there is none)."""
    if seen.upload.record is not None:
        return {"upload": seen.upload.record.status()}
    return {"upload": None} if prior.get("upload") else {}


def _publish_condition(
    cr: SpeculatorTraining,
    trainer: JobView,
    evaluator: JobView,
    publisher: JobView,
    seen: Observed,
    uploaded: Obj,
    prior: Obj,
) -> Desired | None:
    """Published with `spec.export`; after it was removed, False (`NotRequested`) where a
    Published condition was already shown; else none."""
    if cr.spec.export is not None:
        return _published(cr, trainer, evaluator, publisher, seen, uploaded.get("url"))
    if find(prior.get("conditions") or [], "Published") is None:
        return None
    running = (
        " (an upload already running was left to finish)"
        if publisher.exists and not (publisher.complete or publisher.failed)
        else ""
    )
    return Desired(
        "Published", False, "NotRequested", f"spec.export was removed: nothing is uploaded{running}"
    )


def upload_status(cr: SpeculatorTraining, prior: Obj, seen: Observed, now: str) -> Obj:
    """A completed run whose `spec.export` changed (or that was asked to retry): the run stays
    Complete (its draft is on the claim), Published follows the new upload Job, and
    `status.artifact.url`/`revision` the latest upload that succeeded. No data is read."""
    evaluated = evaluated_after_run(prior)
    trainer = JobView(exists=True, complete=True)
    evaluator = (
        JobView(exists=True, complete=True)
        if evaluated
        else JobView(exists=True, failed=True)
        if evaluated is None
        else JobView()
    )
    publisher = JobView.of(seen.publish_job)
    uploaded = _uploaded(seen, prior)
    ready = find(prior.get("conditions") or [], "Ready") or {}
    done = f"speculator exported to {FINAL_DIR}"
    message = str(ready.get("message") or done)
    if evaluated is not None:
        note = _upload_phase(cr, publisher, seen) if cr.spec.export is not None else ""
        message = f"{done}{note if isinstance(note, str) else f'; uploading again: {note[2]}'}"
    desired = lifecycle(Phase.COMPLETE, "Complete", message[:MESSAGE_LIMIT])
    published = _publish_condition(cr, trainer, evaluator, publisher, seen, uploaded, prior)
    if published is not None:
        desired.append(published)
    generation = cr.metadata.generation or 0
    out: Obj = {
        **prior,
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
    }
    if prior.get("artifact"):
        out["artifact"] = {**prior["artifact"], **uploaded}
    return out | _upload_record(seen, prior)


def _uploaded(seen: Observed, prior: Obj) -> Obj:
    """`url` and `revision` of the upload: from its pod's report, else as status recorded them."""
    report = latest_report(seen.publish_pods) or {}
    if report.get("url"):
        out = {"url": str(report["url"])[:1024]}
        return out | ({"revision": str(report["commit"])[:64]} if report.get("commit") else {})
    before = prior.get("artifact") or {}
    return {k: before[k] for k in ("url", "revision") if before.get(k)}


def _live_fields(live: dict[str, float], now: str, counts: Sequence[str], figures: Sequence[str] = ()) -> Obj:
    """`status.progress` fields from the metrics read live (nothing when none were read):
    `counts` as integers, `figures` rounded, the ETA also for people, and when it was read."""
    if not live:
        return {}
    out: Obj = {"updatedAt": now}
    for name in counts:
        if name in live:
            out[name] = int(live[name])
    for name in figures:
        if name in live:
            out[name] = round(live[name], 4)
    if "etaSeconds" in out:
        out["eta"] = eta_text(out["etaSeconds"])
    return out


STALL_REASONS = frozenset({"InvalidSpec", "ImmutableFieldChanged", "ChildConflict"}) | FINDING_REASONS
"""Failed because of the spec, not the workload: re-checked on every refresh (a fix unblocks it)."""
BLOCKED_REASONS = frozenset(
    {"ImmutableFieldChanged", "Forbidden", "Invalid", "FailedCreate", "StorageNotBound", "DataGenNotFound"}
)
"""Stalled by something outside the run (an edit, the cluster, a missing object): not Failed."""


def is_terminal(status: Obj) -> bool:
    """The run finished (Complete, or Failed in its workload): nothing may be re-created."""
    conditions = status.get("conditions") or []
    failed = find(conditions, "Failed") or {}
    return is_true(conditions, "Complete") or (
        failed.get("status") == "True" and failed.get("reason") not in STALL_REASONS
    )


def finished_components(status: Obj) -> frozenset[str]:
    """Stages whose outcome the status has recorded. Their Jobs are never created again, and get
    their `ttlSecondsAfterFinished` only now, so the TTL controller cannot delete a finished Job
    (and its pods' reports) before the status has seen it finish."""
    if is_terminal(status):
        return frozenset({FETCHER, GENERATOR, DATA, TRAINER, EVALUATOR, PUBLISHER})
    conditions = status.get("conditions") or []
    done = {GENERATOR} if is_true(conditions, "ShardsComplete") else set()
    if is_true(conditions, CACHED):
        done.add(FETCHER)
    if is_true(conditions, "Exported"):
        done |= {DATA, TRAINER}  # the inline data was consumed: a lost child is not generated again
    if is_true(conditions, "Evaluated"):
        done.add(EVALUATOR)
    if is_true(conditions, "Published"):
        done.add(PUBLISHER)
    return frozenset(done)


def component_of(child: Obj) -> str:
    return str(((child.get("metadata") or {}).get("labels") or {}).get(common.COMPONENT_LABEL) or "")


def may_create(child: Obj, finished: frozenset[str]) -> bool:
    """False for the Job (or inline SpeculatorDataGen) of a stage that has finished: after its TTL
    removed it, creating it again would redo hours of GPU work."""
    return not (child.get("kind") in STAGE_KINDS and component_of(child) in finished)


def hold_ttl(child: Obj, finished: frozenset[str]) -> Obj:
    """The Job without `ttlSecondsAfterFinished` while its stage is unrecorded (see above)."""
    spec = child.get("spec") or {}
    if child.get("kind") != "Job" or component_of(child) in finished or "ttlSecondsAfterFinished" not in spec:
        return child
    return {**child, "spec": {k: v for k, v in spec.items() if k != "ttlSecondsAfterFinished"}}


def settled_status(generation: int, prior: Obj) -> Obj:
    """A finished run's status with only the generation moved on (mutable knobs changed after the end)."""
    conditions = [{**c, "observedGeneration": generation} for c in prior.get("conditions") or []]
    return {**prior, "observedGeneration": generation, "conditions": conditions}


def waiting_status(generation: int, prior: Obj, message: str, now: str, overdue: bool) -> Obj:
    """The referenced SpeculatorDataGen does not exist: waiting, then (`overdue`, after a grace
    period) Stalled with a Warning, so a typo in `dataGenRef` does not wait silently forever."""
    if overdue:
        desired = lifecycle(Phase.BLOCKED, "DataGenNotFound", message)
    else:
        desired = lifecycle(Phase.PENDING, "WaitingForData", message)
    return {
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
    }


def stalled_status(
    generation: int, prior: Obj, reason: str, message: str, now: str, domain: str | None
) -> Obj:
    """Status of a run that cannot go on: Stalled; Failed too when the spec itself cannot run
    (not for `BLOCKED_REASONS`); and the failing domain condition."""
    phase = Phase.BLOCKED if reason in BLOCKED_REASONS else Phase.STALLED
    desired = lifecycle(phase, reason, message)
    if domain is not None:
        desired.append(Desired(domain, False, reason, message))
    return {
        "observedGeneration": generation,
        "conditions": merge(prior.get("conditions") or [], desired, generation, now),
    }


def compatible_condition(findings: Sequence[Any], checked: bool) -> Desired:
    """VerifierCompatible from validation findings (`checked` = the verifier dimensions were known).
    Storage classes are not readable with namespaced RBAC: a claim that cannot bind shows in Ready."""
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
    return Desired("VerifierCompatible", True, "Compatible", "layers, vocabulary and GPUs checked")
