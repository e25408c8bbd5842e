"""Reconciliation: make the children exist, then make the status tell the truth.

Both entry points are idempotent and level-triggered, so a restart at any point converges to the
same state: children have deterministic names and are created only when missing (an operator
killed between two steps never makes a second Job), and the status is recomputed from scratch.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_api.errors import format_validation_error
from finetune_api.resource import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    ConditionType,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from finetune_operator import builders, dra
from finetune_operator.builders import JobIdentity
from finetune_operator.children import ChildFailure, child_kind
from finetune_operator.dra import Allocation
from finetune_operator.kube import Kube, api_message
from finetune_operator.kueue import WorkloadView
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import (
    Diagnosis,
    GpuNode,
    GpuRequirement,
    diagnose_unschedulable,
    gpu_requirement,
)
from finetune_operator.settings import Settings
from finetune_operator.status import Observation, Transition, derive, finished

log = logging.getLogger(__name__)
# Children are created concurrently: the requests are independent and the API server is the wait.
SHAPED = ("ConfigMap", "ResourceClaimTemplate", "Job")  # what the spec shapes: dry-run first
# Made once the others exist: binding a Role needs the Role (the API server checks that the
# operator holds what it grants), and the Job's pods need the rest.
LAST = ("RoleBinding", "Job")
_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="children")

# Posts a Kubernetes Event about the FineTuneJob: (body, type, reason, message).
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def identity(body: Mapping[str, Any]) -> JobIdentity:
    meta = body["metadata"]
    labels = meta.get("labels") or {}
    return JobIdentity(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        generation=meta.get("generation"),
        queue=labels.get(KUEUE_QUEUE_LABEL),
        priority=labels.get(KUEUE_PRIORITY_LABEL),
    )


def parse_spec(body: Mapping[str, Any]) -> tuple[FineTuneJobSpec | None, str | None]:
    """The typed spec, or the one-line validation error."""
    try:
        return FineTuneJobSpec.model_validate(body.get("spec") or {}), None
    except ValidationError as exc:
        return None, format_validation_error(exc, "spec")


def _refused(body: Mapping[str, Any]) -> bool:
    """Whether the status says a child of this generation was refused (ChildrenReady=False)."""
    status = FineTuneJobStatus.model_validate(body.get("status") or {})
    ready = status.condition(ConditionType.CHILDREN.value)
    generation = body["metadata"].get("generation")
    return (
        ready is not None
        and ready.status == "False"
        and ready.reason in ("ChildRejected", "ChildCreateFailed")
        and ready.observed_generation == generation
    )


class Reconciler:
    def __init__(self, settings: Settings, kube: Kube, events: EventSink) -> None:
        self.settings = settings
        self.kube = kube
        self.events = events
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, uid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[uid]

    def reconcile(self, body: Mapping[str, Any]) -> ChildFailure | None:
        """FineTuneJob created, changed or seen at start-up, or a child of it deleted: ensure the
        children (unless the job has finished: Succeeded and Failed are final), refresh status.
        Returns the refusal of a child, already reported in the status and an Event."""
        job = identity(body)
        with self._lock(job.uid):
            spec, invalid = parse_spec(body)
            if spec is None:
                log.warning("%s/%s is invalid: %s", job.namespace, job.name, invalid)
                self._write_status(
                    body, Observation(generation=job.generation, now=now(), invalid=invalid)
                )
                return None
            requirement = gpu_requirement(spec, self.settings)
            previous = FineTuneJobStatus.model_validate(body.get("status") or {})
            failure = None
            created_job = False
            deleting = body["metadata"].get("deletionTimestamp") is not None
            if not finished(previous) and not deleting:
                failure, created_job = self._ensure_children(job, spec, requirement)
            if not created_job:
                # (A Job made just now is followed by its own event, whose refresh writes the
                # status: one status write and one FineTuneJob event fewer per new job.)
                self._refresh(body, spec, requirement, failure)
            return failure

    def refresh(
        self, namespace: str, name: str, *, heal: bool | Literal["deleted"] = False
    ) -> None:
        """A child changed: recompute the owner's status; `heal` (the periodic check, or
        "deleted": a child was deleted) also re-creates missing children, as reconcile does."""
        body = self.kube.get_finetunejob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # gone or going: garbage collection is removing its children
        if heal == "deleted" and _refused(body):
            # The deletion is the roll-back of a refused pass: retrying on its events would loop
            # at event speed. The status already says why; kopf (for a refusal that may pass),
            # the periodic check or a spec change try again.
            return
        if heal:
            failure = self.reconcile(body)
            if failure is not None:
                log.warning("%s/%s: %s", namespace, name, failure.describe())
            return
        job = identity(body)
        with self._lock(job.uid):
            spec, _invalid = parse_spec(body)
            if spec is not None:
                self._refresh(body, spec, gpu_requirement(spec, self.settings))

    def refresh_job(self, namespace: str, job_name: str) -> None:
        """Kueue's Workload of this Job changed: refresh the FineTuneJob that owns the Job."""
        api_job = self.kube.get_job(namespace, job_name)
        meta = api_job["metadata"] if api_job is not None else {}
        if builders.LABEL_UID not in (meta.get("labels") or {}):
            return  # not one of ours
        owner = (meta.get("annotations") or {}).get(builders.LABEL_NAME)
        if owner:
            self.refresh(namespace, owner)

    def tick(self, namespace: str, name: str) -> None:
        """Periodic check of a job that waits for its pod: heal a missing Job, refresh the status
        (the Job controller's FailedCreate Events change no object the operator watches)."""
        missing = self.kube.get_job(namespace, builders.job_name(name)) is None
        self.refresh(namespace, name, heal=missing)

    def _children(
        self, job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
    ) -> list[Any]:
        children: list[Any] = []
        if self.settings.status_reporting:
            children += [
                builders.build_service_account(job),
                builders.build_role(job),
                builders.build_role_binding(job),
            ]
        children.append(builders.build_config_map(job, spec, requirement))
        if spec.resources.nodes > 1:
            children.append(builders.build_workers_service(job))
        if self.settings.dra:
            children.append(builders.build_resource_claim_template(job, spec, requirement))
        children.append(builders.build_job(job, spec, requirement, self.settings))
        return children

    def _ensure_children(
        self, job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
    ) -> tuple[ChildFailure | None, bool]:
        """Create the missing children, all or none, in three round trips of concurrent requests:
        a server-side dry run of what the spec shapes (the ConfigMap, the ResourceClaimTemplate in
        DRA mode, the Job), then the other children, then the RoleBinding and the Job. A refused dry run
        creates nothing; what a pass created is deleted again if a later child is refused.
        Returns the refusal, if any, and whether the Job was created."""
        children = self._children(job, spec, requirement)
        shaped = [c for c in children if child_kind(c) in SHAPED]
        checks = list(_POOL.map(lambda c: self._create(c, dry_run=True), shaped))
        failure = next((o for o in checks if isinstance(o, ChildFailure)), None)
        if failure is not None:
            return failure, False  # nothing created
        exists = {id(c) for c, o in zip(shaped, checks, strict=True) if o is False}
        todo = [c for c in children if id(c) not in exists]
        last = [c for c in todo if child_kind(c) in LAST]
        created: list[Any] = []
        for stage in ([c for c in todo if child_kind(c) not in LAST], last):
            outcomes = list(_POOL.map(self._create, stage))
            created += [c for c, o in zip(stage, outcomes, strict=True) if o is True]
            failure = next((o for o in outcomes if isinstance(o, ChildFailure)), None)
            if failure is not None:
                for done in reversed(created):
                    self.kube.delete(done)
                return failure, False
        if created:
            names = ", ".join(f"{child_kind(c)} {c.metadata.name}" for c in created)
            log.info("%s/%s: created %s", job.namespace, job.name, names)
        return None, any(child_kind(c) == "Job" for c in created)

    def _create(self, child: Any, *, dry_run: bool = False) -> bool | ChildFailure:
        """True when created (or creatable), False when it exists, else the refusal."""
        try:
            return self.kube.create_if_missing(child, dry_run=dry_run)
        except ApiException as exc:
            if exc.status is None or exc.status >= 500 or exc.status == 429:
                raise  # the API server is busy or down: kopf retries with back-off
            return ChildFailure(
                kind=child_kind(child),
                name=child.metadata.name,
                status=exc.status,
                message=api_message(exc),
            )

    def _refresh(
        self,
        body: Mapping[str, Any],
        spec: FineTuneJobSpec,
        requirement: GpuRequirement,
        failure: ChildFailure | None = None,
    ) -> None:
        job = identity(body)
        api_job = self.kube.get_job(job.namespace, builders.job_name(job.name))
        job_view = JobView.from_api(api_job) if api_job is not None else None
        pods = tuple(PodView.from_api(p) for p in self.kube.list_pods(job.namespace, job.uid))
        job_events: tuple[tuple[str, str, str], ...] = ()
        if job_view is not None and not pods:
            job_events = tuple(self.kube.job_events(job.namespace, job_view.name))
        newest = max(pods, key=lambda p: (p.created, p.name), default=None)
        node = diagnosis = allocation = None
        if newest is not None and self.settings.dra:
            node, diagnosis, allocation = self._dra_placement(job.namespace, requirement, newest)
        elif newest is not None and newest.node is not None:
            node = self.kube.gpu_node(newest.node, self.settings.labels)
        elif newest is not None and newest.unschedulable is not None:
            nodes = self.kube.gpu_nodes(self.settings.labels)
            diagnosis = diagnose_unschedulable(requirement, nodes, newest.unschedulable)
        workload = None
        if job.queued and job_view is not None:
            found = self.kube.get_workload(job.namespace, job_view.uid)
            workload = WorkloadView.from_api(found) if found is not None else None
        if job_view is not None:
            self._apply_run_control(job, spec, job_view, workload)
        obs = Observation(
            generation=job.generation,
            now=now(),
            requirement=requirement,
            job=job_view,
            pods=pods,
            node=node,
            diagnosis=diagnosis,
            allocation=allocation,
            suspend=spec.suspend,
            spec_changed=job_view is not None and job_view.spec_hash != builders.spec_hash(spec),
            adapter_uri=spec.output.uri,
            child_failure=failure,
            expected_job=builders.job_name(job.name),
            job_events=job_events,
            queue=job.queue,
            workload=workload,
        )
        self._write_status(body, obs)

    def _dra_placement(
        self, namespace: str, requirement: GpuRequirement, pod: PodView
    ) -> tuple[GpuNode | None, Diagnosis | None, Allocation | None]:
        """DRA: the devices the pod's claim was allocated once it is bound; while it cannot be
        placed, why, against the GPUs the ResourceSlices offer."""
        if pod.node is None and pod.unschedulable is None:
            return None, None, None
        offered = self.kube.gpu_devices()
        if pod.node is None:
            diagnosis = diagnose_unschedulable(
                requirement,
                [d.as_gpu() for d in offered],
                pod.unschedulable or "",
                noun="devices",
                none=dra.NO_DEVICES,
            )
            return None, diagnosis, None
        for name in pod.claims:
            claim = self.kube.get_resource_claim(namespace, name)
            found = dra.allocation(claim, offered) if claim is not None else None
            if found is not None:
                return found.summary(pod.node), None, found
        return None, None, None

    def _apply_run_control(
        self,
        job: JobIdentity,
        spec: FineTuneJobSpec,
        view: JobView,
        workload: WorkloadView | None,
    ) -> None:
        """Honour spec.suspend live: through the Job's own suspend, or, for a Job Kueue holds,
        through Kueue's own switch, the Workload's spec.active (Kueue then evicts it and suspends
        the Job; the operator never flips the suspend of a queued Job). (The Job's pod failure
        policy stops retries the trainer said cannot succeed.)"""
        finished = view.complete_time is not None or view.failed_reason is not None
        if finished:
            return
        if job.queued:
            if workload is not None and workload.active == spec.suspend:
                self.kube.set_workload_active(job.namespace, workload.name, not spec.suspend)
            return
        if view.suspended != spec.suspend:
            self.kube.set_job_suspend(job.namespace, view.name, spec.suspend)

    def _write_status(self, body: Mapping[str, Any], obs: Observation) -> None:
        meta = body["metadata"]
        previous = FineTuneJobStatus.model_validate(body.get("status") or {})
        status, transitions = derive(previous, obs)
        new = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        old = previous.model_dump(mode="json", by_alias=True, exclude_none=True)
        old.pop("progress", None)  # the trainer's part
        if new != old:
            self.kube.patch_finetunejob_status(meta["namespace"], meta["name"], new)
        for transition in transitions:
            self._announce(body, transition)

    def _announce(self, body: Mapping[str, Any], transition: Transition) -> None:
        try:
            self.events(body, transition.type, transition.reason, transition.message)
        except Exception:  # an Event is best effort; never fail the reconciliation for it
            log.exception("could not post event %s", transition.reason)
