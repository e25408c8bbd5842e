"""Reconciliation: make the children exist, then make the status tell the truth.

Both entry points are idempotent and level-triggered, so a restart at any point converges to the
same state: children have deterministic names and are created only when missing (an operator
killed between two steps never makes a second Job), and the status is recomputed from scratch.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
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
from finetune_operator import builders, dra, trainer_identity
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
from finetune_operator.status import (
    JobEvents,
    Observation,
    Transition,
    derive,
    finished,
    newest_pod,
)

log = logging.getLogger(__name__)
# Children are created concurrently, each as soon as what it needs exists: binding a Role needs
# the Role (the API server checks that the operator holds what the binding grants), and the Job's
# pods need their ServiceAccount (a pod naming one that does not exist is refused, and the Job
# controller backs off) and, with DRA, the ResourceClaimTemplate. (The ServiceAccount, Role and
# RoleBinding are the namespace's trainer identity, made by the first pass in a namespace:
# trainer_identity.py. The trainer's config travels in the Job's pod template.) Most jobs have
# the Job alone to create.
NEEDS = {
    "Job": ("ServiceAccount", "ResourceClaimTemplate"),
    "RoleBinding": ("Role",),
}
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


@dataclass(frozen=True)
class Seen:
    """What the operator's watch caches (kopf indices of Jobs, pods and GPU nodes) hold for one
    FineTuneJob, read in the event loop and handed to the reconciler: a status refresh reads
    nothing from the API server but the object. `pods` are every pod labelled with the job's
    name, each with its owner's uid (a FineTuneJob deleted and made again under the same name
    has a new uid); `nodes` are the GPU nodes the newest pod needs: the one it is bound to, or,
    while it cannot be scheduled, all of them. `taken` orders snapshots: one taken later is
    never older."""

    job: JobView | None = None
    pods: tuple[tuple[str, PodView], ...] = ()
    nodes: tuple[GpuNode, ...] = ()
    taken: int = 0

    @classmethod
    def collect(
        cls,
        job: JobView | None,
        pods: Iterable[tuple[str, PodView]],
        nodes: Mapping[str, Iterable[GpuNode]] | None,
        taken: int = 0,
    ) -> Seen:
        owned = tuple(pods)
        newest = newest_pod(p for _, p in owned)
        needed: tuple[GpuNode, ...] = ()
        if nodes is not None and newest is not None:
            if newest.node is not None:
                needed = tuple(nodes.get(newest.node, ()))
            elif newest.unschedulable is not None:
                needed = tuple(n for found in nodes.values() for n in found)
        return cls(job=job, pods=owned, nodes=needed, taken=taken)


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


# A snapshot of what the watch caches hold for a FineTuneJob (namespace, name), taken at the call.
Look = Callable[[str, str], Seen]


class Reconciler:
    def __init__(self, settings: Settings, kube: Kube, events: EventSink, look: Look) -> None:
        self.settings = settings
        self.kube = kube
        self.events = events
        self.look = look
        # One pass at a time per FineTuneJob (namespace, name). A pass reads the object inside
        # it, so it never acts on a status older than the last pass wrote; and it never derives
        # from a snapshot of the caches older than the last pass used (`_current`): a pass that
        # waited behind a newer one would turn a pod's Running, seen after its Succeeded, into a
        # finished job running again.
        self._used: dict[tuple[str, str], int] = {}
        # Jobs a reconcile pass has run for in this process: the periodic check heals only these
        # (a job kopf has not handled yet, in a burst or after a restart, gets its create or
        # resume handler; a heal before it would do that work twice).
        self._handled: set[tuple[str, str]] = set()
        self._locks: defaultdict[tuple[str, str], threading.RLock] = defaultdict(threading.RLock)
        self._locks_guard = threading.Lock()
        # Children this operator deleted to undo a refused pass: their DELETED events are no
        # reason to make them again (that would loop at event speed).
        self._undone: set[tuple[str, str, str]] = set()
        # Namespaces whose trainer identity (trainer_identity.py) a pass has seen made, or found.
        self._identities: set[str] = set()
        # The disrupted pods (by name) each job's Events have told of: a disruption is news once,
        # whether a pass saw it on the newest pod or only after its replacement came.
        self._told: dict[tuple[str, str], set[str]] = {}

    def _lock(self, namespace: str, name: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks[namespace, name]

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: drop what was kept for it."""
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            self._used.pop((namespace, name), None)
            self._handled.discard((namespace, name))
            self._told.pop((namespace, name), None)

    def _current(self, namespace: str, name: str, seen: Seen | None) -> Seen:
        """The pass's snapshot, or a new one if the last pass used a newer one (or none came).
        Called with the job's lock held."""
        last = self._used.get((namespace, name))
        if seen is None or (last is not None and seen.taken < last):
            seen = self.look(namespace, name)
        self._used[namespace, name] = seen.taken
        return seen

    def undone(self, kind: str, namespace: str, name: str) -> bool:
        """Whether this child's deletion was the undoing of a refused pass (asked once)."""
        with self._locks_guard:
            key = (kind, namespace, name)
            found = key in self._undone
            self._undone.discard(key)
            return found

    def reconcile(self, body: Mapping[str, Any], seen: Seen | None = None) -> ChildFailure | None:
        """FineTuneJob created, changed or seen at start-up, or a child of it deleted: ensure the
        children (unless the job has finished: Succeeded and Failed are final), refresh status.
        Returns the refusal of a child, already reported in the status and an Event."""
        job = identity(body)
        with self._lock(job.namespace, job.name):
            self._handled.add((job.namespace, job.name))
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
                current = self._current(job.namespace, job.name, seen)
                self._refresh(body, spec, requirement, current, failure)
            return failure

    def refresh(
        self,
        namespace: str,
        name: str,
        seen: Seen | None = None,
        *,
        heal: bool | Literal["deleted"] = False,
        job_events: JobEvents | None = None,
    ) -> None:
        """A child changed: recompute the owner's status from `seen`; `heal` (the periodic
        check, or "deleted": a child was deleted) also re-creates missing children, as reconcile
        does; `job_events` (the periodic check) are the Job's Warning Events."""
        with self._lock(namespace, name):
            body = self.kube.get_finetunejob(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return  # gone or going: garbage collection is removing its children
            if heal == "deleted" and _refused(body):
                # A refused pass is retried by kopf (for a refusal that may pass), the periodic
                # check or a spec change, not at the speed of its children's events.
                return
            if heal:
                failure = self.reconcile(body, seen)
                if failure is not None:
                    log.warning("%s/%s: %s", namespace, name, failure.describe())
                return
            spec, _invalid = parse_spec(body)
            if spec is not None:
                requirement = gpu_requirement(spec, self.settings)
                current = self._current(namespace, name, seen)
                self._refresh(body, spec, requirement, current, job_events=job_events)

    def tick(self, namespace: str, waiting: Sequence[tuple[str, Seen]]) -> None:
        """Periodic check of a namespace's jobs that wait for their pod: heal a missing Job, and
        refresh the status of a job whose Job the Job controller says it cannot make a pod for
        (FailedCreate: only an Event, no watched object changes). The Events are listed once for
        the namespace, and only jobs with something to say are refreshed."""
        warnings: dict[str, list[tuple[str, str, str]]] | None = None
        for name, seen in waiting:
            try:
                if seen.job is None:
                    if self._lost_job(namespace, name):
                        self.refresh(namespace, name, seen, heal=True)
                    continue
                if warnings is None:
                    warnings = self.kube.job_warnings(namespace)
                events = warnings.get(seen.job.name)
                if events:
                    self.refresh(namespace, name, seen, job_events=tuple(events))
            except Exception:  # one job's trouble never stops the others' checks
                log.exception("periodic check of %s/%s failed", namespace, name)

    def _lost_job(self, namespace: str, name: str) -> bool:
        """Whether a job whose Job the caches do not hold has really lost it: a reconcile pass
        has run for it in this process (before that, kopf's create or resume handler makes its
        children), and the API server has no such Job either (in a burst the caches lag behind
        the Jobs the operator made: healing those would make every child again, 409s)."""
        if (namespace, name) not in self._handled:
            return False
        return not self.kube.job_exists(namespace, builders.job_name(name))

    def _children(
        self, job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
    ) -> Iterator[Any]:
        """The children, each built when the pass asks for the next, in the order they are
        created (each after what it NEEDS, the Job last): the first create is on its way while
        the rest are built."""
        if self.settings.status_reporting and job.namespace not in self._identities:
            yield from trainer_identity.build_identity(job.namespace)
        if spec.resources.nodes > 1:
            yield builders.build_workers_service(job)
        if self.settings.dra:
            yield builders.build_resource_claim_template(job, spec, requirement)
        yield builders.build_job(job, spec, requirement, self.settings)

    def _ensure_children(
        self, job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
    ) -> tuple[ChildFailure | None, bool]:
        """Create the missing children, all or none: concurrently, each as soon as it is built
        and what it NEEDS exists (in a namespace's first job, the Job after one round trip: its
        ServiceAccount and Role go together). What a pass created is deleted again if a child is
        refused (but the namespace's trainer identity, which other jobs share).
        Returns the refusal, if any, and whether the Job was created."""
        present: set[str] = set()
        waiting: list[Any] = []
        done: set[str] = set()
        created: list[Any] = []
        failure: ChildFailure | None = None
        running: dict[Future[bool | ChildFailure], Any] = {}

        def start_ready() -> None:
            for child in list(waiting):
                needs = NEEDS.get(child_kind(child), ())
                if failure is None and all(n in done or n not in present for n in needs):
                    waiting.remove(child)
                    running[_POOL.submit(self._create, child)] = child

        def collect(timeout: float | None) -> None:
            nonlocal failure
            finished_now, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in finished_now:
                child = running.pop(future)
                outcome = future.result()
                if isinstance(outcome, ChildFailure):
                    failure = failure or outcome
                    continue
                done.add(child_kind(child))
                if outcome:
                    created.append(child)

        for child in self._children(job, spec, requirement):
            present.add(child_kind(child))
            waiting.append(child)
            if running:
                collect(0)  # what finished meanwhile
            if failure is not None:
                break  # a refusal stops the rest
            start_ready()
        while waiting or running:
            start_ready()
            if not running:
                break  # a refusal stopped the rest
            collect(None)
        if failure is not None:  # (the namespace's trainer identity is shared: kept)
            self._undo(c for c in reversed(created) if not trainer_identity.is_identity(c))
            return failure, False
        if self.settings.status_reporting:
            self._identities.add(job.namespace)
        if created:
            names = ", ".join(f"{child_kind(c)} {c.metadata.name}" for c in created)
            log.info("%s/%s: created %s", job.namespace, job.name, names)
        return None, any(child_kind(c) == "Job" for c in created)

    def identity_lost(self, namespace: str) -> None:
        """A part of the namespace's trainer identity was deleted: make it again now (or with
        the namespace's next job)."""
        self._identities.discard(namespace)
        self.restore_identity(namespace)

    def restore_identity(self, namespace: str) -> None:
        """Make what is missing of the namespace's trainer identity again while the namespace
        has FineTuneJobs (their training pods use it); else its next job makes it."""
        with self._locks_guard:
            if not any(ns == namespace for ns, _ in self._handled):
                return
        for part in trainer_identity.build_identity(namespace):
            outcome = self._create(part)
            if isinstance(outcome, ChildFailure):
                log.warning("trainer identity of namespace %s: %s", namespace, outcome.describe())
                return
            if outcome:
                log.info("%s: made %s %s again", namespace, child_kind(part), part.metadata.name)
        self._identities.add(namespace)

    def _undo(self, created: Iterable[Any]) -> None:
        for child in created:
            with self._locks_guard:
                self._undone.add((child_kind(child), child.metadata.namespace, child.metadata.name))
            self.kube.delete(child)

    def _create(self, child: Any) -> bool | ChildFailure:
        """True when created, False when it exists, else the refusal."""
        try:
            return self.kube.create_if_missing(child)
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
        seen: Seen,
        failure: ChildFailure | None = None,
        *,
        job_events: JobEvents | None = None,
    ) -> None:
        job = identity(body)
        job_view = seen.job
        pods = tuple(p for uid, p in seen.pods if uid == job.uid)
        events = job_events if job_view is not None and not pods else None
        newest = newest_pod(pods)
        told = self._told.get((job.namespace, job.name), set())
        disrupted = tuple(p for p in pods if p.disruption and p.name not in told)
        node = diagnosis = allocation = None
        if newest is not None and self.settings.dra:
            node, diagnosis, allocation = self._dra_placement(job.namespace, requirement, newest)
        elif newest is not None and newest.node is not None:
            node = next((n for n in seen.nodes if n.name == newest.node), None)
        elif newest is not None and newest.unschedulable is not None:
            diagnosis = diagnose_unschedulable(requirement, list(seen.nodes), newest.unschedulable)
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
            job_events=events,
            queue=job.queue,
            workload=workload,
            disrupted=disrupted,
        )
        self._write_status(body, obs)
        if disrupted:
            self._told.setdefault((job.namespace, job.name), set()).update(
                p.name for p in disrupted
            )

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
