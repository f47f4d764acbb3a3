"""Thin kopf handlers: read the CR, ask the pure modules what should exist, make it so, write status.

Every entry point (create, resume, update, the periodic timer, and watches of the child Jobs,
StatefulSets and SpeculatorDataGens) runs the same idempotent `reconcile` on the resource as
stored now, one at a time per resource, so status is level-based and follows a child within
seconds. Children are created with POST and changed with JSON merge patches (no server-side
apply: a v1.20 server rejects it for Jobs with integer GPU limits). A finished stage is never
re-created: its completion is recorded in status before its Job gets a TTL, and once the run is
Complete (or Failed by its workload), only status bookkeeping happens.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from specops.config import ConfigError
from specops_operator import API_VERSION, GROUP, PREFIX, VERSION, restarts, stream_keys, uploads
from specops_operator.api import (
    DATAGEN_KIND,
    TRAINING_KIND,
    SpeculatorDataGen,
    SpeculatorTraining,
    immutable_changes,
    parse_resource,
)
from specops_operator.builders import stream
from specops_operator.builders.common import (
    COMPONENT_LABEL,
    INSTANCE_LABEL,
    KIND_LABEL,
    KUEUE_QUEUE_LABEL,
    Defaults,
    Manifest,
    Owner,
)
from specops_operator.builders.datagen import GENERATOR, DataGenNames, build_datagen
from specops_operator.builders.drift import (
    Ownership,
    adoption_patch,
    controller_of,
    mutable_patch,
    ownership,
    queued_scaling,
    workload_patch,
)
from specops_operator.builders.modelcache import FETCHER, CacheNames
from specops_operator.builders.publish import PUBLISHER, UploadKey
from specops_operator.builders.training import (
    EVALUATOR,
    TRAINER,
    DataSource,
    TrainingNames,
    build_training,
    inline_source,
    upload_job,
)
from specops_operator.conditions import elapsed, is_true, now_rfc3339, transitions
from specops_operator.jobs import JobView, parse_ranges
from specops_operator.kube import PLURALS, ApiError, Kube
from specops_operator.metrics import OperatorMetrics
from specops_operator.progress import metrics_endpoints, rank0_endpoint, read_generation, read_progress
from specops_operator.status import (
    CACHED,
    Observed,
    compatible_condition,
    datagen_status,
    describe,
    finished_components,
    hold_ttl,
    is_terminal,
    looks_stuck,
    may_create,
    running_pods,
    settled_status,
    stalled_status,
    training_status,
    upload_status,
    waiting_status,
)
from specops_operator.trust import AllowList
from specops_operator.validation import check_datagen, check_training

log = logging.getLogger(__name__)

APPLIED = f"{PREFIX}/applied-spec"
"""Annotation holding the spec the children were first built from (immutable fields are checked
against it). kopf leaves annotations under its own prefix out of its diffs."""
CHILD_KINDS = (
    ("batch/v1", "Job"),
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    (API_VERSION, DATAGEN_KIND),
)
"""Every kind the operator creates and lists; what `delete` cleans up (RBAC mirrors this list)."""
COLLECTED_KINDS = (("v1", "Secret"), ("networking.k8s.io/v1", "NetworkPolicy"))
"""Kinds the operator only creates and reads (a stream's key Secret and NetworkPolicy): never
listed, patched or deleted by it, so it needs no broader right on Secrets; the garbage collector
removes them with their owner."""
KUEUE_WORKLOAD = ("kueue.x-k8s.io/v1beta1", "Workload")
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"
"""The label Kueue puts on the Workload it creates for a Job."""


@dataclass
class Context:
    """What handlers share: the API client, operator defaults and timings."""

    kube: Kube | None = None
    defaults: Defaults = field(default_factory=Defaults)
    allow: AllowList = field(default_factory=AllowList)
    """Images and ServiceAccounts CRs may name (empty: any)."""
    interval: float = 30.0
    """Seconds between level-based status refreshes of each resource."""
    backoff: float = 10.0
    """Seconds before a handler that hit an API error is retried."""
    data_grace: float = 120.0
    """Seconds a `dataGenRef` may name a missing SpeculatorDataGen before the training is Stalled
    (it may be applied in the same `kubectl apply` batch, just after)."""
    reconciles: int = 0
    """Reconciles since start (shown by the liveness probe)."""
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    """Prometheus metrics (`--metrics-port`)."""
    locks: dict[tuple[str, str, str], threading.Lock] = field(default_factory=dict)
    """One per resource: the timer, spec changes and child watches never reconcile it at once."""
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self.locks.setdefault((kind, namespace, name), threading.Lock())

    @property
    def api(self) -> Kube:
        """The client; created on first use from the in-cluster account or kubeconfig."""
        if self.kube is None:
            self.kube = Kube.from_environment()
        return self.kube


class Stall(Exception):
    """The spec cannot run as written: Stalled with this reason, no (further) children created."""

    def __init__(self, reason: str, message: str, domain: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.domain = domain


# --------------------------------------------------------------------------- children


REFUSED = {403: "Forbidden", 422: "Invalid"}
"""API answers that a retry cannot fix (quota, admission policy, an invalid field): Stalled with
the server's message, re-tried by the refresh timer instead of kopf's endless backoff."""


def _refused(exc: ApiError, verb: str, desired: Manifest) -> Stall:
    meta = desired["metadata"]
    what = f"{verb} {desired['kind']} {meta['namespace']}/{meta['name']}"
    return Stall(REFUSED[exc.status], f"{what}: {exc.status} {exc.reason}: {exc.message}"[:1024])


def ensure(
    kube: Kube, desired: Manifest, owner_uid: str, *, fresh: bool, create: bool = True
) -> Manifest | None:
    """Create the child, or check and converge the one that exists. AlreadyExists is success.

    `fresh` (the CR has no status yet): try creating first, one request per child in the common
    case; otherwise read first, as the child almost always exists already. `create=False`: only
    converge it if it exists (None if not).
    """
    meta = desired["metadata"]
    existing = None if fresh and create else _read(kube, desired)
    if existing is None:
        if not create:
            return None
        try:
            return kube.create(desired)
        except ApiError as exc:
            if exc.status in REFUSED:
                raise _refused(exc, "create", desired) from None
            if exc.status != 409:
                raise
            existing = _read(kube, desired)
            if existing is None:
                raise kopf.TemporaryError(
                    f"{desired['kind']} {meta['name']} is being deleted", delay=2
                ) from exc
    verdict = ownership(existing, desired, owner_uid)
    if verdict is Ownership.CONFLICT:
        raise Stall(
            "ChildConflict", f"{desired['kind']} {meta['name']!r} exists and is not owned by this resource"
        )
    patch = mutable_patch(existing, desired)
    if verdict is Ownership.ADOPT:
        patch.update(adoption_patch(desired))
    if not patch:
        return existing
    try:
        return kube.patch(*_key(desired), patch)
    except ApiError as exc:
        if exc.status in REFUSED:
            raise _refused(exc, "patch", desired) from None
        raise


def _key(desired: Manifest) -> tuple[str, str, str, str]:
    meta = desired["metadata"]
    return desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"]


def _read(kube: Kube, desired: Manifest) -> Manifest | None:
    """The child as it exists; a read the operator's RBAC lacks (an older chart) stalls naming it."""
    try:
        return kube.get(*_key(desired))
    except ApiError as exc:
        if exc.status == 403:
            raise _refused(exc, "get", desired) from None
        raise


def ensure_all(
    kube: Kube, children: list[Manifest], owner_uid: str, prior: Manifest
) -> dict[tuple[str, str], Manifest]:
    """Every child that exists now; a finished stage's Job is converged (its TTL) but never created.
    `prior` is the status: none yet means a new resource."""
    finished = finished_components(prior)
    out: dict[tuple[str, str], Manifest] = {}
    for child in children:
        desired = hold_ttl(child, finished)
        got = ensure(kube, desired, owner_uid, fresh=not prior, create=may_create(child, finished))
        if got is not None:
            out[(child["kind"], child["metadata"]["name"])] = got
    return out


def pods_of(kube: Kube, namespace: str, instance: str, kind: str, component: str) -> tuple[Manifest, ...]:
    labels = {INSTANCE_LABEL: instance, KIND_LABEL: kind, COMPONENT_LABEL: component}
    return tuple(kube.list("v1", "Pod", namespace, labels))


def events_about(kube: Kube, namespace: str, *objects: Manifest | None) -> tuple[Manifest, ...]:
    """Events of these objects (FailedCreate, ProvisioningFailed): read only for a stuck stage."""
    out: list[Manifest] = []
    for obj in filter(None, objects):
        out += kube.events(namespace, obj["kind"], obj["metadata"]["name"])
    return tuple(out)


def sync_kueue(kube: Kube, job: Manifest | None, suspend: bool) -> None:
    """With a Kueue queue, Kueue alone flips Job.suspend; `spec.suspend` (de)activates the Job's
    Kueue Workload instead (`spec.active`), which makes Kueue evict or re-queue it."""
    meta = (job or {}).get("metadata") or {}
    if not meta.get("uid"):
        return
    try:
        workloads = kube.list(*KUEUE_WORKLOAD, meta["namespace"], {KUEUE_JOB_UID: meta["uid"]})
    except ApiError as exc:
        if exc.status == 404:  # Kueue is not installed
            return
        if exc.status == 403:
            raise Stall(
                "Forbidden", f"suspending a queued Job needs Kueue Workloads (chart: kueue.enabled): {exc}"
            ) from None
        raise
    for workload in workloads:
        patch = workload_patch(workload, suspend=suspend)
        if patch:
            kube.patch(*KUEUE_WORKLOAD, meta["namespace"], workload["metadata"]["name"], patch)


# --------------------------------------------------------------------------- reconcile


class Waiting(Exception):
    """Nothing to do until something else exists (a referenced SpeculatorDataGen)."""


def _claim_found(kube: Kube, namespace: str, claim: str | None) -> bool | None:
    if not claim:
        return None
    return kube.get("v1", "PersistentVolumeClaim", namespace, claim) is not None


def ensure_stream_keys(kube: Kube, cr: SpeculatorDataGen) -> None:
    """The stream's CURVE key Secret: created once with fresh keys; an existing one is only checked
    (never re-keyed, as running pods hold the keys they mounted). Keys are never logged."""
    owner = Owner.of(cr)
    identity = stream.key_secret(owner)
    found = ensure(kube, identity, owner.uid, fresh=False, create=False)
    if found is None:
        ensure(kube, stream.key_secret(owner, stream_keys.generate()), owner.uid, fresh=True)


def _fetch_job(kube: Kube, cr: SpeculatorDataGen | SpeculatorTraining) -> Manifest | None:
    """The `modelCache` download Job, as read before building (whether it succeeded decides which
    children are built); None without a model cache of this resource's own."""
    meta = cr.metadata
    assert meta.namespace
    return kube.get("batch/v1", "Job", meta.namespace, CacheNames.of(cr.kind, meta.name).job)


def _fetched(job: Manifest | None, prior: Manifest) -> bool:
    """The download succeeded: its Job says so, or status recorded it (the Job may be gone by TTL)."""
    return JobView.of(job).complete or is_true(prior.get("conditions") or [], CACHED)


def observe_fetch(
    kube: Kube,
    cr: SpeculatorDataGen | SpeculatorTraining,
    job: Manifest | None,
    claim: Manifest | None,
    prior: Manifest,
) -> Observed:
    """The download stage as status needs it: its pods only for a report, a failure or pods that may
    not run, and Events only while it looks stuck."""
    meta = cr.metadata
    assert meta.namespace
    view = JobView.of(job)
    recorded = is_true(prior.get("conditions") or [], CACHED)
    unread = (view.complete and not recorded) or view.failed or view.unsure
    pods = pods_of(kube, meta.namespace, meta.name, cr.kind, FETCHER) if unread else ()
    stuck = not recorded and looks_stuck(view, pods)
    return Observed(
        job=job,
        pods=pods,
        claim=claim,
        events=events_about(kube, meta.namespace, job, claim) if stuck else (),
    )


def reconcile_datagen(cr: SpeculatorDataGen, prior: Manifest, ctx: Context, now: str) -> Manifest:
    kube = ctx.api
    meta = cr.metadata
    assert meta.namespace and meta.uid
    names = DataGenNames(meta.name, meta.namespace)
    storage = cr.spec.storage
    claim = storage.existing_claim if storage else None
    findings, arch = check_datagen(cr.spec, _claim_found(kube, meta.namespace, claim))
    if findings:
        raise Stall(findings[0].reason, "; ".join(f.message for f in findings), "VerifierCompatible")
    cache = CacheNames.of(cr.kind, meta.name)
    fetch = _fetch_job(kube, cr) if cr.spec.model_cache is not None else None
    try:
        children = build_datagen(cr, ctx.defaults, cache_ready=_fetched(fetch, prior))
    except ConfigError as exc:
        raise Stall("InvalidSpec", str(exc)) from None
    if stream.curve_on(cr.spec):
        ensure_stream_keys(kube, cr)
    existing = ensure_all(kube, children, meta.uid, prior)
    job = existing.get(("Job", names.job))
    fetch = existing.get(("Job", cache.job), fetch)
    if KUEUE_QUEUE_LABEL in meta.labels and _kueue_due(cr.spec.suspend, prior):
        for queued in (fetch, job):
            sync_kueue(kube, queued, cr.spec.suspend)
    view = JobView.of(job)
    counted = parse_ranges(str((prior.get("progress") or {}).get("countedIndexes") or ""))
    unread = view.succeeded > len(counted) or view.failed
    generating = view.active > 0 and not (view.complete or view.failed or view.suspended)
    listed = unread or view.unsure or generating
    pods = pods_of(kube, meta.namespace, meta.name, DATAGEN_KIND, GENERATOR) if listed else ()
    data_claim = existing.get(("PersistentVolumeClaim", names.claim))
    events = events_about(kube, meta.namespace, job, data_claim) if looks_stuck(view, pods) else ()
    seen = Observed(
        job=job,
        broker=existing.get(("StatefulSet", names.broker)),
        pods=pods,
        claim=data_claim,
        events=events,
        fetch=None
        if cr.spec.model_cache is None
        else observe_fetch(kube, cr, fetch, existing.get(("PersistentVolumeClaim", cache.claim)), prior),
        live=read_generation(metrics_endpoints(pods)) if generating else {},
    )
    return datagen_status(cr, prior, seen, now, compatible_condition(findings, arch is not None))


def _kueue_due(suspend: bool, prior: Manifest) -> bool:
    """Kueue's Workload must be (kept) deactivated, or re-activated once after a resume."""
    return suspend or is_true(prior.get("conditions") or [], "Suspended")


def _data_source(cr: SpeculatorTraining, kube: Kube) -> DataSource:
    meta = cr.metadata
    assert meta.namespace
    if cr.spec.data_gen is not None:
        child = kube.get(
            API_VERSION, DATAGEN_KIND, meta.namespace, TrainingNames(meta.name, meta.namespace).datagen
        )
        return inline_source(cr, (child.get("status") or {}) if child else None)
    assert cr.spec.data_gen_ref is not None
    ref = cr.spec.data_gen_ref.name
    obj = kube.get(API_VERSION, DATAGEN_KIND, meta.namespace, ref)
    if obj is None:
        raise Waiting(f"SpeculatorDataGen {ref!r} not found in namespace {meta.namespace!r}")
    return DataSource.of(obj)


def _evaluated(kube: Kube, names: TrainingNames, prior: Manifest) -> bool:
    """The evaluation succeeded (the upload waits for it so the model card carries its figures):
    recorded in status, or its Job says so now."""
    if is_true(prior.get("conditions") or [], "Evaluated"):
        return True
    return JobView.of(kube.get("batch/v1", "Job", names.namespace, names.eval_job)).complete


def ensure_upload(
    kube: Kube, cr: SpeculatorTraining, desired: Manifest | None, prior: Manifest
) -> tuple[Manifest | None, uploads.UploadStep]:
    """The upload Job for `spec.export` as it is now (`desired`: None while no upload may run):
    kept, replaced (a stale one is observed once more, then deleted after the status is written;
    the new one is made by a later reconcile, once the old is gone), cancelled, or made.
    Returns the Job to observe."""
    meta = cr.metadata
    assert meta.namespace and meta.uid
    name = TrainingNames(meta.name, meta.namespace).publish_job
    existing = kube.get("batch/v1", "Job", meta.namespace, name)
    export = cr.spec.export
    wanted = UploadKey.of(export, meta.annotations) if export is not None else None
    view = JobView.of(existing)
    running = False
    if uploads.key_of(existing, wanted) != wanted and view.active:  # stale: does a pod of it run?
        pods = pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, PUBLISHER)
        running = running_pods(view, pods) > 0
    step = uploads.decide(wanted, desired is not None, existing, running, prior)
    if not (step.keep or step.create):
        return None, step
    if desired is None or step.delete or step.record != wanted:  # a stale Job: nothing to converge
        return existing, step
    job = ensure(
        kube,
        hold_ttl(desired, frozenset({PUBLISHER}) if uploads.settled(prior, wanted) else frozenset()),
        meta.uid,
        fresh=False,
        create=step.create,
    )
    return job, step


def reconcile_training(
    cr: SpeculatorTraining, prior: Manifest, ctx: Context, now: str
) -> tuple[Manifest, tuple[Manifest, ...], uploads.UploadStep]:
    """The status, the Jobs to delete once that status is written (a failed trainer attempt, a
    stale upload), and what was done with the upload Job."""
    kube = ctx.api
    meta = cr.metadata
    assert meta.namespace and meta.uid
    names = TrainingNames(meta.name, meta.namespace)
    data = _data_source(cr, kube)
    claim_found = _claim_found(kube, meta.namespace, cr.spec.storage.existing_claim)
    findings, arch = check_training(cr.spec, data, claim_found)
    if findings:
        raise Stall(findings[0].reason, "; ".join(f.message for f in findings), "VerifierCompatible")
    job = kube.get("batch/v1", "Job", meta.namespace, names.job)
    exported = is_true(prior.get("conditions") or [], "Exported")
    trained = JobView.of(job).complete or exported
    own_cache = cr.spec.model_cache is not None and cr.spec.data_gen is None
    cache = CacheNames.of(cr.kind, meta.name)
    fetch = _fetch_job(kube, cr) if own_cache else None
    failed_pods = (
        pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, TRAINER) if JobView.of(job).failed else ()
    )
    group = restarts.decide(prior.get("trainer") or {}, job, failed_pods, cr.spec.trainer.max_restarts)
    try:
        children = build_training(
            cr,
            ctx.defaults,
            data,
            trained=trained,
            fetched=_fetched(fetch, prior),
            attempt=group.attempt,
            evaluated=trained and cr.spec.export is not None and _evaluated(kube, names, prior),
        )
    except ConfigError as exc:
        raise Stall("InvalidSpec", str(exc)) from None
    upload = next((c for c in children if c["metadata"]["name"] == names.publish_job), None)
    existing = ensure_all(kube, [c for c in children if c is not upload], meta.uid, prior)
    if job is None or trained:  # else keep the read `trained` was decided on: status agrees with it
        job = existing.get(("Job", names.job), job)
    eval_job = existing.get(("Job", names.eval_job))
    publish_job, step = ensure_upload(kube, cr, upload, prior)
    fetch = existing.get(("Job", cache.job), fetch)
    if KUEUE_QUEUE_LABEL in meta.labels and _kueue_due(cr.spec.suspend, prior):
        for queued in (fetch, job, eval_job, publish_job):
            sync_kueue(kube, queued, cr.spec.suspend)
    trainer, evaluator, publisher = JobView.of(job), JobView.of(eval_job), JobView.of(publish_job)
    # The final report once (live progress fills `step` before it, so that cannot be the marker).
    read_trainer = (trainer.complete and not exported) or trainer.failed
    read_eval = (evaluator.complete and not prior.get("evaluation")) or evaluator.failed
    training = trainer.active > 0 and not (trainer.complete or trainer.failed or trainer.suspended)
    pods = failed_pods or (
        pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, TRAINER)
        if read_trainer or trainer.unsure or training
        else ()
    )
    endpoint = rank0_endpoint(pods) if training else None
    live = read_progress(endpoint) if endpoint else {}
    eval_pods = (
        pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, EVALUATOR)
        if read_eval or evaluator.unsure
        else ()
    )
    publish_pods = upload_pods(kube, cr, publisher, step, prior)
    output = existing.get(("PersistentVolumeClaim", names.claim))
    stages = ((job, trainer, pods), (eval_job, evaluator, eval_pods), (publish_job, publisher, publish_pods))
    stuck = [j for j, v, p in stages if looks_stuck(v, p)]
    seen = Observed(
        job=job,
        pods=pods,
        eval_job=eval_job,
        eval_pods=eval_pods,
        publish_job=publish_job,
        publish_pods=publish_pods,
        upload=step,
        claim=output,
        events=events_about(kube, meta.namespace, *stuck, output) if stuck else (),
        fetch=observe_fetch(kube, cr, fetch, existing.get(("PersistentVolumeClaim", cache.claim)), prior)
        if own_cache
        else None,
        group=group,
        live=live,
    )
    status = training_status(cr, prior, data, seen, now, compatible_condition(findings, arch is not None))
    stale = publish_job if step.delete else None
    return status, tuple(j for j in (job if group.teardown else None, stale) if j is not None), step


def upload_pods(
    kube: Kube, cr: SpeculatorTraining, publisher: JobView, step: uploads.UploadStep, prior: Manifest
) -> tuple[Manifest, ...]:
    """The upload pods, read for an outcome status has not recorded yet (the report's URL, the
    error line) or while some may not run."""
    meta = cr.metadata
    assert meta.namespace
    unread = publisher.failed or (publisher.complete and not uploads.settled(prior, step.record))
    if unread or publisher.unsure:
        return pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, PUBLISHER)
    return ()


def reconcile_upload(
    cr: SpeculatorTraining, prior: Manifest, ctx: Context, now: str
) -> tuple[Manifest, uploads.UploadStep, tuple[Manifest, ...]]:
    """A completed run with upload work (`uploads.due`): only the upload Job is made or replaced,
    and nothing of the data is read (its SpeculatorDataGen may be gone by now)."""
    kube = ctx.api
    meta = cr.metadata
    assert meta.namespace
    evaluated = uploads.evaluated_after_run(prior)
    desired = None
    if cr.spec.export is not None and evaluated is not None:
        desired = upload_job(cr, ctx.defaults, evaluated=evaluated)
    job, step = ensure_upload(kube, cr, desired, prior)
    view = JobView.of(job)
    pods = upload_pods(kube, cr, view, step, prior)
    stuck = looks_stuck(view, pods)
    seen = Observed(
        publish_job=job,
        publish_pods=pods,
        upload=step,
        events=events_about(kube, meta.namespace, job) if stuck else (),
    )
    if KUEUE_QUEUE_LABEL in meta.labels and _kueue_due(cr.spec.suspend, prior):
        sync_kueue(kube, job, cr.spec.suspend)
    return upload_status(cr, prior, seen, now), step, ((job,) if step.delete and job is not None else ())


def upload_events(step: uploads.UploadStep) -> tuple[tuple[str, str], ...]:
    """(reason, message) of the Events a step is worth."""
    if step.retried:
        return (("UploadRetried", step.retried),)
    if step.cancelled:
        return (
            ("UploadCancelled", "spec.export was removed: the upload Job that had not started was deleted"),
        )
    return ()


@dataclass(frozen=True)
class Outcome:
    """What a reconcile decided: the status, and the spec to record once children exist."""

    status: Manifest
    applied: str | None = None
    teardown: tuple[Manifest, ...] = ()
    """Jobs to delete (foreground) after the status is written: a failed trainer attempt (its
    restart recorded), a stale upload Job (its outcome recorded)."""
    events: tuple[tuple[str, str], ...] = ()
    """(reason, message) of Normal Events to post besides the condition transitions."""


def _applied_spec(body: Manifest) -> Manifest | None:
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(APPLIED)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _owner_gone(kube: Kube, body: Manifest) -> bool:
    """The resource's controller (the training of an inline DataGen) is deleted or being deleted:
    garbage collection takes this one too, so it must create nothing (not even a retained PVC that
    would outlive both), e.g. when the operator restarts after the training was deleted."""
    owner = controller_of(body)
    if owner is None or owner.get("kind") != TRAINING_KIND:
        return False
    found = kube.get(API_VERSION, TRAINING_KIND, body["metadata"]["namespace"], owner["name"])
    return (
        found is None
        or found["metadata"].get("uid") != owner.get("uid")
        or bool(found["metadata"].get("deletionTimestamp"))
    )


def release_ttl(kube: Kube, body: Manifest) -> None:
    """A finished run's Jobs get the CR's `ttlSecondsAfterFinished` now that status recorded them."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    if ttl is None:
        return
    meta = body["metadata"]
    for job in kube.list(
        "batch/v1", "Job", meta["namespace"], {INSTANCE_LABEL: meta["name"], KIND_LABEL: body["kind"]}
    ):
        if (job.get("spec") or {}).get("ttlSecondsAfterFinished") != ttl:
            kube.patch(
                "batch/v1",
                "Job",
                meta["namespace"],
                job["metadata"]["name"],
                {"spec": {"ttlSecondsAfterFinished": ttl}},
            )


def _upload_due(body: Manifest, prior: Manifest) -> bool:
    """A completed training whose `spec.export` (or retry request) is not the one its status
    shows, or whose new upload is under way: it uploads again (`reconcile_upload`)."""
    if body.get("kind") != TRAINING_KIND:
        return False
    try:
        cr = SpeculatorTraining.model_validate(body)
    except ValueError:
        return False  # an unreadable spec stays settled, as before
    export = cr.spec.export
    return uploads.due(prior, UploadKey.of(export, cr.metadata.annotations) if export else None)


def reconcile(body: Manifest, ctx: Context) -> Outcome:
    """Bring children in line with the CR; returns the status to write (never raises for bad specs).

    Order matters: a resource being deleted (or whose owner is) creates nothing; a finished run
    stays finished (its Jobs may be gone after their TTL); then the spec is checked against the
    one the children were built from, because servers without CEL accept any update and a
    refresh must never act on an illegal one.
    """
    prior = dict(body.get("status") or {})
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    now = now_rfc3339()
    ctx.reconciles += 1
    if meta.get("deletionTimestamp") or _owner_gone(ctx.api, body):
        return Outcome(prior)  # being deleted: the cleanup handler (or the GC) owns the children now
    try:
        upload_only = is_terminal(prior) and _upload_due(body, prior)
        if is_terminal(prior) and not upload_only:
            release_ttl(ctx.api, body)
            return Outcome(settled_status(generation, prior))
        applied = _applied_spec(body)
        spec = body.get("spec") or {}
        if applied is not None:
            try:
                changed = immutable_changes(applied, spec, body["kind"])
            except ValueError:
                changed = []  # an unreadable record: the current spec is validated below
            changed += queued_scaling(applied, spec, meta.get("labels") or {})
            if changed:
                raise Stall("ImmutableFieldChanged", "; ".join(changed))
        cr = parse_resource(body, f"{body['kind']} {meta.get('name')}")
        refused = ctx.allow.refusals(cr)
        if refused:
            raise Stall("NotAllowed", "; ".join(refused))
        teardown: tuple[Manifest, ...] = ()
        events: tuple[tuple[str, str], ...] = ()
        if isinstance(cr, SpeculatorDataGen):
            status = reconcile_datagen(cr, prior, ctx, now)
        else:
            if upload_only:
                status, step, teardown = reconcile_upload(cr, prior, ctx, now)
            else:
                status, teardown, step = reconcile_training(cr, prior, ctx, now)
            events = upload_events(step)
        record = None if applied is not None else json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return Outcome(status, record, teardown, events)
    except ConfigError as exc:
        return Outcome(stalled_status(generation, prior, "InvalidSpec", str(exc), now, None))
    except Stall as stall:
        return Outcome(stalled_status(generation, prior, stall.reason, stall.message, now, stall.domain))
    except Waiting as waiting:
        overdue = elapsed(str(meta.get("creationTimestamp") or now), now) > ctx.data_grace
        return Outcome(waiting_status(generation, prior, str(waiting), now, overdue))


# --------------------------------------------------------------------------- kopf glue


def write(kube: Kube, body: Manifest, outcome: Outcome) -> None:
    """Record the applied spec once, patch status when it changed, one Event per transition."""
    meta = body["metadata"]
    key = (API_VERSION, body["kind"], meta["namespace"], meta["name"])
    if outcome.applied is not None:
        kube.patch(*key, {"metadata": {"annotations": {APPLIED: outcome.applied}}})
    for reason, message in outcome.events:
        kopf.event(cast(kopf.Body, body), type="Normal", reason=reason, message=message[:1024])
    status = outcome.status
    prior = dict(body.get("status") or {})
    if status == {k: prior.get(k) for k in status}:
        return
    kube.patch(*key, {"status": status}, subresource="status")
    for change in transitions(prior.get("conditions") or [], status.get("conditions") or []):
        kopf.event(
            cast(kopf.Body, body),  # kopf reads only the object reference
            type="Warning" if change.warning else "Normal",
            reason=change.reason,
            message=f"{change.type}={change.status}: {change.message}"[:1024],
        )
    group, before = status.get("trainer") or {}, prior.get("trainer") or {}
    if int(group.get("restarts") or 0) > int(before.get("restarts") or 0):
        kopf.event(
            cast(kopf.Body, body),
            type="Warning",
            reason="TrainerRestarted",
            message=f"restart {group['restarts']}: {describe(group.get('lastFailure'))}"[:1024],
        )


def delete_attempt(kube: Kube, job: Manifest) -> None:
    """Delete a failed trainer attempt's (or a stale upload's) Job with foreground propagation:
    the Job (and the name the next one takes) stays until its pods are gone, so no pod of it
    outlives it. The uid precondition spares a newer Job of the same name."""
    meta = job["metadata"]
    kube.delete(
        "batch/v1", "Job", meta["namespace"], meta["name"], propagation="Foreground", uid=meta.get("uid")
    )


def refresh(ctx: Context, kind: str, namespace: str, name: str) -> None:
    """Reconcile one resource as stored now and write its status; one at a time per resource,
    so a watch-triggered refresh never writes a status older than the one it read."""
    with ctx.lock(kind, namespace, name):
        body = ctx.api.get(API_VERSION, kind, namespace, name)
        if body is not None:
            with ctx.metrics.reconciling(kind):
                outcome = reconcile(body, ctx)
            ctx.metrics.record(body, outcome.status)
            write(ctx.api, body, outcome)
            for job in outcome.teardown:
                delete_attempt(ctx.api, job)


def delete_children(kube: Kube, body: Manifest) -> int:
    """Delete every child that carries our ownerReference; retained PVCs (no reference) stay."""
    meta = body["metadata"]
    labels = {INSTANCE_LABEL: meta["name"], KIND_LABEL: body["kind"]}
    deleted = 0
    for api_version, kind in CHILD_KINDS:
        for child in kube.list(api_version, kind, meta["namespace"], labels):
            refs = (child.get("metadata") or {}).get("ownerReferences") or []
            if any(r.get("uid") == meta.get("uid") for r in refs):
                deleted += kube.delete(api_version, kind, meta["namespace"], child["metadata"]["name"])
    return deleted


def configure(settings: kopf.OperatorSettings) -> None:
    """Our own finalizer and annotation prefix; Events only from us (and kopf's errors)."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    # Our two resources are known at start: no CRD/namespace watching (less RBAC; exact
    # namespace names only, no globs).
    settings.scanning.disabled = True
    # A deletion waits for a refresh that is mid-flight; re-check each second, not each minute.
    settings.background.cancellation_polling = 1.0


def owner_of(child: Manifest) -> tuple[str, str] | None:
    """(kind, name) of the SpecOps resource a child belongs to, from the labels every child carries."""
    labels = (child.get("metadata") or {}).get("labels") or {}
    kind, name = labels.get(KIND_LABEL), labels.get(INSTANCE_LABEL)
    return (kind, name) if kind in (DATAGEN_KIND, TRAINING_KIND) and name else None


def register(registry: kopf.OperatorRegistry, ctx: Context) -> None:
    """Attach every handler for both kinds to `registry` (tests use a registry of their own)."""
    for kind in (DATAGEN_KIND, TRAINING_KIND):
        resource = (GROUP, VERSION, PLURALS[kind])

        def on_change(body: Any, **_: Any) -> None:
            meta = body["metadata"]
            refresh(ctx, body["kind"], meta["namespace"], meta["name"])

        def on_suspend(body: Any, old: Any, new: Any, **_: Any) -> None:
            if bool(old) != bool(new):
                kopf.event(
                    body,
                    type="Normal",
                    reason="Suspended" if new else "Resumed",
                    message="spec.suspend is true: Jobs suspended"
                    if new
                    else "spec.suspend is false: Jobs resumed",
                )

        def on_delete(body: Any, **_: Any) -> None:
            ctx.metrics.forget(body)
            deleted = delete_children(ctx.api, dict(body))
            meta = body["metadata"]
            ctx.locks.pop((body["kind"], meta["namespace"], meta["name"]), None)
            log.info("%s %s/%s: deleted %d children", body["kind"], meta["namespace"], meta["name"], deleted)

        backoff = ctx.backoff
        kopf.on.create(*resource, id="reconcile", backoff=backoff, registry=registry)(on_change)
        kopf.on.resume(*resource, id="reconcile", backoff=backoff, registry=registry)(on_change)
        kopf.on.update(*resource, id="reconcile", backoff=backoff, registry=registry)(on_change)
        kopf.on.field(*resource, field="spec.suspend", id="suspend", backoff=backoff, registry=registry)(
            on_suspend
        )
        kopf.on.timer(
            *resource,
            interval=ctx.interval,
            initial_delay=ctx.interval,
            id="refresh",
            backoff=backoff,
            registry=registry,
        )(on_change)
        kopf.on.delete(*resource, id="cleanup", backoff=backoff, registry=registry)(on_delete)

    def on_child(body: Any, **_: Any) -> None:
        """A child Job, StatefulSet or inline SpeculatorDataGen changed: its owner's status follows
        now, not at the next timer tick."""
        owner = owner_of(dict(body))
        if owner is not None:
            refresh(ctx, owner[0], body["metadata"]["namespace"], owner[1])

    ours = {KIND_LABEL: kopf.PRESENT, INSTANCE_LABEL: kopf.PRESENT}
    for group, version, plural in (
        ("batch", "v1", "jobs"),
        ("apps", "v1", "statefulsets"),
        (GROUP, VERSION, PLURALS[DATAGEN_KIND]),
    ):
        kopf.on.event(group, version, plural, id=f"child-{plural}", labels=ours, registry=registry)(on_child)

    @kopf.index(GROUP, VERSION, PLURALS[TRAINING_KIND], id="data_refs", registry=registry)
    def data_refs(namespace: Any, name: Any, spec: Any, **_: Any) -> Any:
        """(namespace, dataGenRef) -> the trainings that read it."""
        ref = (spec.get("dataGenRef") or {}).get("name")
        return {(namespace, ref): name} if ref else None

    @kopf.on.event(GROUP, VERSION, PLURALS[DATAGEN_KIND], id="referenced", registry=registry)
    def on_referenced(body: Any, **kwargs: Any) -> None:
        """A SpeculatorDataGen changed: the trainings naming it in `dataGenRef` follow now."""
        namespace = body["metadata"]["namespace"]
        for training in kwargs["data_refs"].get((namespace, body["metadata"]["name"]), []):
            refresh(ctx, TRAINING_KIND, namespace, training)

    @kopf.on.probe(registry=registry, id="reconciles")
    def reconciles(**_: Any) -> int:
        """Shown on the liveness endpoint: reconciles done since start."""
        return ctx.reconciles
