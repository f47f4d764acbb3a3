"""Thin kopf handlers: read the CR, ask the pure modules what should exist, make it so, write status.

Every entry point (create, resume, update, the suspend field, the periodic timer) runs the same
idempotent `reconcile`, so status is level-based: it is recomputed from the children as they
are now, not only from events. Children are created with POST and changed with JSON merge
patches (no server-side apply: a v1.20 server rejects it for Jobs with integer GPU limits).
A finished run is never re-created: once Complete (or Failed by its workload), only status
bookkeeping happens, even after a TTL deleted its Jobs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from specops.config import ConfigError
from specops_operator import API_VERSION, GROUP, PREFIX, VERSION
from specops_operator.api import (
    DATAGEN_KIND,
    TRAINING_KIND,
    SpeculatorDataGen,
    SpeculatorTraining,
    immutable_changes,
    parse_resource,
)
from specops_operator.builders.common import COMPONENT_LABEL, INSTANCE_LABEL, KIND_LABEL, Defaults, Manifest
from specops_operator.builders.datagen import GENERATOR, DataGenNames, build_datagen
from specops_operator.builders.drift import Ownership, adoption_patch, mutable_patch, ownership
from specops_operator.builders.training import (
    EVALUATOR,
    TRAINER,
    DataSource,
    TrainingNames,
    build_training,
    inline_source,
)
from specops_operator.conditions import is_true, now_rfc3339, transitions
from specops_operator.kube import PLURALS, ApiError, Kube
from specops_operator.metrics import OperatorMetrics
from specops_operator.status import (
    JobView,
    Observed,
    compatible_condition,
    datagen_status,
    is_terminal,
    parse_ranges,
    settled_status,
    stalled_status,
    training_status,
    waiting_status,
)
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
"""Every kind the operator creates; what `delete` cleans up (RBAC mirrors this list)."""


@dataclass
class Context:
    """What handlers share: the API client, operator defaults and timings."""

    kube: Kube | None = None
    defaults: Defaults = field(default_factory=Defaults)
    interval: float = 30.0
    """Seconds between level-based status refreshes of each resource."""
    backoff: float = 10.0
    """Seconds before a handler that hit an API error is retried."""
    reconciles: int = 0
    """Reconciles since start (shown by the liveness probe)."""
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    """Prometheus metrics (`--metrics-port`)."""

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


def ensure(kube: Kube, desired: Manifest, owner_uid: str, *, suspend: bool, fresh: bool) -> Manifest:
    """Create the child, or check and converge the one that exists. AlreadyExists is success.

    `fresh` (the CR has no status yet): try creating first, one request per child in the common
    case; otherwise read first, as the child almost always exists already.
    """
    meta = desired["metadata"]
    key = (desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"])
    existing = None if fresh else kube.get(*key)
    if existing is None:
        try:
            return kube.create(desired)
        except ApiError as exc:
            if exc.status != 409:
                raise
            existing = kube.get(*key)
            if existing is None:
                raise kopf.TemporaryError(
                    f"{desired['kind']} {meta['name']} is being deleted", delay=2
                ) from exc
    verdict = ownership(existing, desired, owner_uid)
    if verdict is Ownership.CONFLICT:
        raise Stall(
            "ChildConflict", f"{desired['kind']} {meta['name']!r} exists and is not owned by this resource"
        )
    patch = mutable_patch(existing, desired, suspend=suspend)
    if verdict is Ownership.ADOPT:
        patch.update(adoption_patch(desired))
    return kube.patch(*key, patch) if patch else existing


def ensure_all(
    kube: Kube, children: list[Manifest], owner_uid: str, suspend: bool, fresh: bool
) -> dict[tuple[str, str], Manifest]:
    return {
        (c["kind"], c["metadata"]["name"]): ensure(kube, c, owner_uid, suspend=suspend, fresh=fresh)
        for c in children
    }


def pods_of(kube: Kube, namespace: str, instance: str, kind: str, component: str) -> tuple[Manifest, ...]:
    labels = {INSTANCE_LABEL: instance, KIND_LABEL: kind, COMPONENT_LABEL: component}
    return tuple(kube.list("v1", "Pod", namespace, labels))


# --------------------------------------------------------------------------- reconcile


class Waiting(Exception):
    """Nothing to do until something else exists (a referenced SpeculatorDataGen)."""


def _claim_found(kube: Kube, namespace: str, claim: str | None) -> bool | None:
    if not claim:
        return None
    return kube.get("v1", "PersistentVolumeClaim", namespace, claim) is not None


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
    try:
        children = build_datagen(cr, ctx.defaults)
    except ConfigError as exc:
        raise Stall("InvalidSpec", str(exc)) from None
    existing = ensure_all(kube, children, meta.uid, cr.spec.suspend, fresh=not prior)
    job = existing[("Job", names.job)]
    view = JobView.of(job)
    counted = parse_ranges(str((prior.get("progress") or {}).get("countedIndexes") or ""))
    unread = view.succeeded > len(counted) or view.failed
    pods = pods_of(kube, meta.namespace, meta.name, DATAGEN_KIND, GENERATOR) if unread else ()
    seen = Observed(job=job, broker=existing.get(("StatefulSet", names.broker)), pods=pods)
    return datagen_status(cr, prior, seen, now, compatible_condition(findings, arch is not None))


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


def reconcile_training(cr: SpeculatorTraining, prior: Manifest, ctx: Context, now: str) -> Manifest:
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
    trained = JobView.of(job).complete or is_true(prior.get("conditions") or [], "Exported")
    try:
        children = build_training(cr, ctx.defaults, data, trained=trained)
    except ConfigError as exc:
        raise Stall("InvalidSpec", str(exc)) from None
    existing = ensure_all(kube, children, meta.uid, cr.spec.suspend, fresh=not prior)
    job = existing.get(("Job", names.job), job)
    eval_job = existing.get(("Job", names.eval_job))
    trainer, evaluator = JobView.of(job), JobView.of(eval_job)
    read_trainer = (trainer.complete and not (prior.get("progress") or {}).get("step")) or trainer.failed
    read_eval = (evaluator.complete and not prior.get("evaluation")) or evaluator.failed
    seen = Observed(
        job=job,
        pods=pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, TRAINER) if read_trainer else (),
        eval_job=eval_job,
        eval_pods=pods_of(kube, meta.namespace, meta.name, TRAINING_KIND, EVALUATOR) if read_eval else (),
    )
    return training_status(cr, prior, data, seen, now, compatible_condition(findings, arch is not None))


@dataclass(frozen=True)
class Outcome:
    """What a reconcile decided: the status, and the spec to record once children exist."""

    status: Manifest
    applied: str | None = None


def _applied_spec(body: Manifest) -> Manifest | None:
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(APPLIED)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def reconcile(body: Manifest, ctx: Context) -> Outcome:
    """Bring children in line with the CR; returns the status to write (never raises for bad specs).

    Order matters: a finished run stays finished (its Jobs may be gone after their TTL); then the
    spec is checked against the one the children were built from, because servers without CEL
    accept any update and a refresh must never act on an illegal one.
    """
    prior = dict(body.get("status") or {})
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    now = now_rfc3339()
    ctx.reconciles += 1
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return Outcome(prior)  # being deleted: the cleanup handler owns the children now
    try:
        if is_terminal(prior):
            return Outcome(settled_status(generation, prior))
        applied = _applied_spec(body)
        spec = body.get("spec") or {}
        if applied is not None:
            try:
                changed = immutable_changes(applied, spec, body["kind"])
            except ValueError:
                changed = []  # an unreadable record: the current spec is validated below
            if changed:
                raise Stall("ImmutableFieldChanged", "; ".join(changed))
        cr = parse_resource(body, f"{body['kind']} {body['metadata'].get('name')}")
        if isinstance(cr, SpeculatorDataGen):
            status = reconcile_datagen(cr, prior, ctx, now)
        else:
            status = reconcile_training(cr, prior, ctx, now)
        record = None if applied is not None else json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return Outcome(status, record)
    except ConfigError as exc:
        return Outcome(stalled_status(generation, prior, "InvalidSpec", str(exc), now, None))
    except Stall as stall:
        return Outcome(stalled_status(generation, prior, stall.reason, stall.message, now, stall.domain))
    except Waiting as waiting:
        return Outcome(waiting_status(generation, prior, str(waiting), now))


# --------------------------------------------------------------------------- kopf glue


def _write(body: Any, patch: kopf.Patch, outcome: Outcome) -> None:
    """Record the applied spec once, patch status when it changed, one Event per transition."""
    if outcome.applied is not None:
        patch.metadata.annotations[APPLIED] = outcome.applied
    status = outcome.status
    prior = dict(body.get("status") or {})
    if status == {k: prior.get(k) for k in status}:
        return
    patch["status"] = status
    for change in transitions(prior.get("conditions") or [], status.get("conditions") or []):
        kopf.event(
            body,
            type="Warning" if change.warning else "Normal",
            reason=change.reason,
            message=f"{change.type}={change.status}: {change.message}"[:1024],
        )


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


def register(registry: kopf.OperatorRegistry, ctx: Context) -> None:
    """Attach every handler for both kinds to `registry` (tests use a registry of their own)."""
    for kind in (DATAGEN_KIND, TRAINING_KIND):
        resource = (GROUP, VERSION, PLURALS[kind])

        def on_change(body: Any, patch: kopf.Patch, **_: Any) -> None:
            with ctx.metrics.reconciling(body["kind"]):
                outcome = reconcile(dict(body), ctx)
            ctx.metrics.record(body, outcome.status)
            _write(body, patch, outcome)

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

    @kopf.on.probe(registry=registry, id="reconciles")
    def reconciles(**_: Any) -> int:
        """Shown on the liveness endpoint: reconciles done since start."""
        return ctx.reconciles
