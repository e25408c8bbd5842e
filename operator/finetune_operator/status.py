"""The FineTuneJob status, derived level-triggered from what exists (pure functions).

Given the validation outcome, the GPU requirement, the training Job and its pods, `derive` computes
the whole operator-owned part of the status: phase, conditions (with stable transition times),
placement, result, times. The trainer owns `status.progress`; nothing here writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune_api.resource import (
    Condition,
    ConditionType,
    FineTuneJobStatus,
    Phase,
    PlacementStatus,
    QueueStatus,
    Result,
)
from finetune_operator.children import ChildFailure
from finetune_operator.dra import Allocation
from finetune_operator.kueue import WorkloadView, admitted_message, waiting
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import Diagnosis, GpuNode, GpuRequirement

ConditionStatus = Literal["True", "False", "Unknown"]
# Warning Events on a Job, oldest first: (time, reason, message).
JobEvents = tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Observation:
    """Everything `derive` looks at."""

    generation: int | None
    now: str
    invalid: str | None = None  # the one-line validation error
    requirement: GpuRequirement | None = None
    job: JobView | None = None
    pods: tuple[PodView, ...] = ()
    node: GpuNode | None = None  # the node the newest pod is bound to
    diagnosis: Diagnosis | None = None  # why the newest pod cannot be scheduled
    allocation: Allocation | None = None  # DRA: the devices the newest pod's claim was given
    suspend: bool = False
    spec_changed: bool = False
    adapter_uri: str | None = None
    child_failure: ChildFailure | None = None  # the API server refused to create a child
    expected_job: str | None = None  # the training Job's name
    # Warning Events on the Job, oldest first; None when not looked at (only the periodic check
    # lists them): a FailedCreate already reported then stands until a pod appears.
    job_events: JobEvents | None = None
    queue: str | None = None  # the LocalQueue (kueue.x-k8s.io/queue-name label), if queued
    workload: WorkloadView | None = None  # Kueue's Workload for the Job
    # Disrupted pods not announced yet in this process (each is news once, even if a replacement
    # came, or the pod was deleted, before any pass saw it as the newest pod).
    disrupted: tuple[PodView, ...] = ()


@dataclass(frozen=True)
class Transition:
    """A phase change worth a Kubernetes Event."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class _Builder:
    previous: FineTuneJobStatus
    obs: Observation
    conditions: dict[str, Condition] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conditions = {c.type: c for c in self.previous.conditions}

    def set(self, type_: ConditionType, status: ConditionStatus, reason: str, message: str) -> None:
        old = self.conditions.get(type_.value)
        changed = old is None or old.status != status
        self.conditions[type_.value] = Condition(
            type=type_.value,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=self.obs.now
            if changed or old is None
            else old.last_transition_time,
            observed_generation=self.obs.generation,
        )

    def clear(self, type_: ConditionType, reason: str, message: str = "") -> None:
        """Set to False, unless the condition never existed (then leave it absent)."""
        if type_.value in self.conditions:
            self.set(type_, "False", reason, message)


FINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)
# Container waiting reasons that mean the training pod will not start by itself.
STUCK_REASONS = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "RunContainerError",
    }
)


def finished(status: FineTuneJobStatus) -> bool:
    """Whether the job ran to an end (Succeeded, or Failed after its Job existed): final, never
    run again. A spec refused before any Job existed is not finished: fixing it starts one."""
    return status.phase in FINAL_PHASES and status.job_name is not None


def newest_pod(pods: Iterable[PodView]) -> PodView | None:
    """The pod made last (a Job's retries and replacements are new pods)."""
    return max(pods, key=lambda p: (p.created, p.name), default=None)


def _rank0_succeeded(pods: tuple[PodView, ...]) -> PodView | None:
    """The newest Succeeded pod that ran rank 0 (index 0 of a multi-node job): its outcome is
    the run's result."""
    return newest_pod(tuple(p for p in pods if p.phase == "Succeeded" and not p.index))


def hopeless_pod(pods: tuple[PodView, ...]) -> PodView | None:
    """A pod whose trainer said retrying cannot help (the Job may already have started another)."""
    return next((p for p in pods if p.phase == "Failed" and p.invalid_input), None)


def _placement(obs: Observation, previous: PlacementStatus | None) -> PlacementStatus | None:
    if obs.requirement is None:
        return previous
    requirement = obs.requirement
    placement = PlacementStatus(
        scheme=requirement.scheme,
        required_compute_capability=str(requirement.min_capability),
        architecture=requirement.min_capability.architecture,
        estimated_gpu_memory_mib=requirement.memory.required_mib if requirement.memory else None,
    )
    newest = newest_pod(obs.pods)
    # What was seen of the same placement stays when it can no longer be read (a DRA claim is
    # deallocated once its pod has finished; a node may be gone).
    same = None
    if previous is not None and newest is not None and previous.node == newest.node:
        same = previous
    if newest is not None and newest.node is not None:
        placement.node = newest.node
        if obs.node is not None:
            placement.gpu_product = obs.node.product
            placement.node_compute_capability = (
                str(obs.node.capability) if obs.node.capability else None
            )
        elif same is not None:
            placement.gpu_product = same.gpu_product
            placement.node_compute_capability = same.node_compute_capability
        if obs.allocation is not None:
            placement.resource_claim = obs.allocation.claim
            placement.gpu_devices = obs.allocation.refs
        elif same is not None:
            placement.resource_claim = same.resource_claim
            placement.gpu_devices = same.gpu_devices
    elif previous is not None and previous.node is not None:
        placement.node = previous.node
        placement.gpu_product = previous.gpu_product
        placement.node_compute_capability = previous.node_compute_capability
        placement.resource_claim = previous.resource_claim
        placement.gpu_devices = previous.gpu_devices
    placement.nodes = _nodes_by_index(obs.pods) or (previous.nodes if previous else None)
    return placement


def _nodes_by_index(pods: tuple[PodView, ...]) -> list[str] | None:
    """A multi-node job's nodes, by completion index (each index's newest pod), once every
    index seen has a bound pod."""
    newest: dict[int, PodView] = {}
    for pod in sorted(pods, key=lambda p: (p.created, p.name)):
        if pod.index is not None:
            newest[pod.index] = pod
    nodes = [newest[i].node for i in sorted(newest)]
    if not nodes or any(node is None for node in nodes):
        return None
    return [node for node in nodes if node is not None]


def _queue(obs: Observation, previous: QueueStatus | None) -> QueueStatus | None:
    if obs.queue is None:
        return None
    if obs.workload is None:
        return previous or QueueStatus(local_queue=obs.queue)
    return obs.workload.queue_status(obs.queue)


def _result(obs: Observation, pod: PodView | None) -> Result:
    outcome = pod.outcome if pod is not None else None
    result = outcome.result if outcome is not None and outcome.result is not None else Result()
    if result.adapter is None:
        result.adapter = obs.adapter_uri
    return result


def derive(
    previous: FineTuneJobStatus, obs: Observation
) -> tuple[FineTuneJobStatus, list[Transition]]:
    """The new operator-owned status, and the transitions to announce as Events."""
    b = _Builder(previous, obs)
    status = FineTuneJobStatus(
        conditions=[],
        observed_generation=obs.generation,
        job_name=obs.job.name if obs.job else previous.job_name,
        placement=_placement(obs, previous.placement),
        start_time=previous.start_time,
        completion_time=previous.completion_time,
        result=previous.result,
        queue=_queue(obs, previous.queue),
    )
    phase, reason, message = _phase(b, obs, status)
    status.phase = phase
    status.message = message
    if obs.spec_changed:
        b.set(
            ConditionType.SPEC_CHANGED,
            "True",
            "SpecChangedAfterStart",
            "the spec changed after the training Job was created; the Job keeps running with the "
            "spec it started with (only suspend applies live). Delete and re-create the "
            "FineTuneJob to train with the new spec.",
        )
    else:
        b.clear(ConditionType.SPEC_CHANGED, "SpecMatchesJob")
    status.conditions = [b.conditions[k] for k in sorted(b.conditions, key=_condition_order)]
    warnings = []
    for type_ in (ConditionType.SCHEDULED, ConditionType.CHILDREN, ConditionType.RUNNING):
        old = previous.condition(type_.value)
        new = b.conditions.get(type_.value)
        if new is None or new.status != "False" or (old is not None and old.reason == new.reason):
            continue
        if type_ is not ConditionType.RUNNING or new.reason in STUCK_REASONS:
            warnings.append(Transition("Warning", new.reason, new.message))
    transitions = []
    # A new phase is announced unless a condition's Warning says the same (the phase Pending for
    # NoCompatibleGPU, say): one Event for one news, at the severity of the condition's.
    # A disruption is announced per pod, below, not as a phase.
    news = phase != previous.phase and reason != "Disrupted"
    if news and all(w.reason != reason for w in warnings):
        kind: Literal["Normal", "Warning"] = "Warning" if phase is Phase.FAILED else "Normal"
        transitions.append(Transition(kind, reason, message))
    return status, transitions + warnings + _disruptions(previous, obs)


def _disruptions(previous: FineTuneJobStatus, obs: Observation) -> list[Transition]:
    """One Event per disrupted pod, unless the status already tells of it (the operator
    restarted since)."""
    messages = [disruption_message(p) for p in obs.disrupted]
    return [Transition("Normal", "Disrupted", m) for m in messages if m != previous.message]


def disruption_message(pod: PodView) -> str:
    return (
        f"training pod {pod.name} disrupted ({pod.disruption}); a replacement resumes from the "
        "last checkpoint without using a retry"
    )


_ORDER = [t.value for t in ConditionType]

# The Scheduled reasons of a job that has no training pod yet: no Job (being created, or refused),
# the Job controller yet to make the pod, or refused to (FailedCreate).
NO_POD_REASONS = frozenset({"JobPending", "PodCreating", "FailedCreate"})


def awaits_pod(status: Mapping[str, Any]) -> bool:
    """Whether a job (its status as the API server holds it) waits for a training pod that no
    watched object will announce: what the periodic check looks at. A Job the Job controller
    cannot make a pod for says so only in Events (FailedCreate); a job with a pod, a queued one
    (Kueue's Workload), a suspended or a finished one changes objects the operator watches."""
    if status.get("phase") not in (None, Phase.PENDING.value, Phase.ADMITTED.value):
        return False
    for condition in status.get("conditions") or []:
        if condition.get("type") == ConditionType.SCHEDULED.value:
            return condition.get("reason") in NO_POD_REASONS
    return True


def _condition_order(type_: str) -> int:
    return _ORDER.index(type_) if type_ in _ORDER else len(_ORDER)


def _phase(b: _Builder, obs: Observation, status: FineTuneJobStatus) -> tuple[Phase, str, str]:
    """Set the conditions and return (phase, reason, message)."""
    if obs.invalid is not None:
        b.set(ConditionType.VALIDATED, "False", "InvalidSpec", obs.invalid)
        b.set(ConditionType.FAILED, "True", "InvalidSpec", obs.invalid)
        return Phase.FAILED, "InvalidSpec", obs.invalid
    b.set(ConditionType.VALIDATED, "True", "Valid", "the spec is valid")
    missing = _children(b, obs)
    if missing is not None:
        return missing
    job = obs.job
    pod = newest_pod(obs.pods)
    if job is None:
        b.set(ConditionType.SCHEDULED, "Unknown", "JobPending", "creating the training Job")
        b.clear(ConditionType.RUNNING, "JobPending", "the training Job is being created")
        return Phase.PENDING, "Created", "training Job is being created"

    ended = _finished(b, obs, status, job, pod)
    if ended is not None:
        return ended
    if _ended_before(b) and b.previous.phase is not None:
        # Succeeded and Failed are final: an observation that says otherwise (a pod's earlier
        # state, seen late) changes nothing; it would have the job trained again.
        return b.previous.phase, "Final", b.previous.message or ""
    return _runnable(b, obs, status, pod)


def _ended_before(b: _Builder) -> bool:
    """Whether the job had ended for good: Succeeded, or Failed by its run (a refusal that a
    fixed spec cleared, just now in _children, is no end)."""
    if not finished(b.previous):
        return False
    kind = ConditionType.COMPLETE if b.previous.phase == Phase.SUCCEEDED else ConditionType.FAILED
    condition = b.conditions.get(kind.value)
    return condition is not None and condition.status == "True"


def _runnable(
    b: _Builder, obs: Observation, status: FineTuneJobStatus, pod: PodView | None
) -> tuple[Phase, str, str]:
    """A job not finished: suspended, queued, or on its way to run."""
    if obs.suspend:
        b.set(
            ConditionType.SUSPENDED,
            "True",
            "Suspended",
            "spec.suspend is true: no training pod runs",
        )
        b.clear(ConditionType.RUNNING, "Suspended", "suspended")
        return Phase.SUSPENDED, "Suspended", "suspended by spec.suspend"
    b.clear(ConditionType.SUSPENDED, "Resumed", "spec.suspend is false")
    if obs.queue is not None:
        return _admission(b, obs, status, pod, obs.queue)
    return _active(b, obs, status, pod)


def _admission(
    b: _Builder, obs: Observation, status: FineTuneJobStatus, pod: PodView | None, queue: str
) -> tuple[Phase, str, str]:
    """A queued job: Queued until Kueue admits its Workload, then as any job, with Admitted in
    place of Pending while the admitted pod is on its way."""
    wait = waiting(queue, obs.workload)
    if wait is not None or obs.workload is None:
        wait = wait or waiting(queue, None)
        assert wait is not None
        b.set(ConditionType.ADMITTED, "False", wait.reason, wait.message)
        b.clear(ConditionType.RUNNING, "Queued", wait.message)
        return Phase.QUEUED, wait.reason, wait.message
    admitted = admitted_message(obs.workload)
    b.set(ConditionType.ADMITTED, "True", "Admitted", admitted)
    phase, reason, message = _active(b, obs, status, pod)
    if phase is Phase.PENDING:  # admitted; the pod is on its way (or says why it is not)
        generic = reason in ("Pending", "Starting")
        return Phase.ADMITTED, "Admitted" if generic else reason, f"{admitted}; {message}"
    return phase, reason, message


def _children(b: _Builder, obs: Observation) -> tuple[Phase, str, str] | None:
    """ChildrenReady: a child the API server refused, or a finished job's Job deleted."""
    failure = obs.child_failure
    if failure is not None:
        b.set(ConditionType.CHILDREN, "False", failure.reason, failure.describe())
        b.clear(ConditionType.RUNNING, failure.reason, failure.describe())
        if failure.permanent:
            b.set(ConditionType.FAILED, "True", failure.reason, failure.describe())
            return Phase.FAILED, failure.reason, failure.describe()
        return Phase.PENDING, failure.reason, failure.describe()
    if obs.job is None and finished(b.previous) and b.previous.phase is not None:
        b.set(
            ConditionType.CHILDREN,
            "False",
            "JobDeletedAfterFinish",
            f"training Job {b.previous.job_name} was deleted after the job finished; a finished "
            "job is never run again (delete and re-create the FineTuneJob to train again)",
        )
        return b.previous.phase, "JobDeletedAfterFinish", b.previous.message or ""
    refused = b.conditions.get(ConditionType.FAILED.value)
    if refused is not None and refused.reason in ("InvalidSpec", "ChildRejected"):
        b.clear(ConditionType.FAILED, "SpecFixed", "the spec was fixed")
    if ConditionType.CHILDREN.value in b.conditions and obs.job is not None:
        b.set(ConditionType.CHILDREN, "True", "Created", "every child of the job exists")
    return None


def _finished(
    b: _Builder, obs: Observation, status: FineTuneJobStatus, job: JobView, pod: PodView | None
) -> tuple[Phase, str, str] | None:
    # One pod's success ends a single-pod job; several pods: the Job says when all have.
    succeeded = pod is not None and pod.phase == "Succeeded" and job.completions == 1
    if job.complete_time is not None or succeeded:
        status.completion_time = (
            status.completion_time
            or job.complete_time
            or (pod.finished_at if pod else None)
            or obs.now
        )
        status.result = _result(obs, _rank0_succeeded(obs.pods))
        message = f"adapter written to {status.result.adapter}"
        b.set(ConditionType.COMPLETE, "True", "Completed", message)
        b.clear(ConditionType.RUNNING, "Completed", "training finished")
        b.clear(ConditionType.FAILED, "Completed")
        return Phase.SUCCEEDED, "Completed", message
    hopeless = hopeless_pod(obs.pods)
    if job.failed_reason is not None or hopeless is not None:
        failed = hopeless or newest_pod(tuple(p for p in obs.pods if p.phase == "Failed"))
        if failed is not None:
            reason = (
                "InvalidInput" if hopeless is not None else (job.failed_reason or "TrainingFailed")
            )
            message = failed.failure_message
        else:
            reason = job.failed_reason or "JobFailed"
            message = job.failed_message or "the training Job failed"
        if job.failed_reason == "DeadlineExceeded":
            reason, message = (
                "DeadlineExceeded",
                job.failed_message or "activeDeadlineSeconds exceeded",
            )
        status.completion_time = status.completion_time or job.failed_time or obs.now
        b.set(ConditionType.FAILED, "True", reason, message)
        b.clear(ConditionType.RUNNING, reason, message)
        return Phase.FAILED, reason, message
    return None


def _failed_create(b: _Builder, obs: Observation) -> str | None:
    """Why the Job controller cannot make the training pod, if it said so (Events), or if it was
    reported before and the Events were not looked at this time."""
    if obs.job_events is None:
        old = b.conditions.get(ConditionType.SCHEDULED.value)
        return old.message if old is not None and old.reason == "FailedCreate" else None
    failed = [m for _, reason, m in obs.job_events if reason == "FailedCreate"]
    return f"the Job controller cannot create the training pod: {failed[-1]}" if failed else None


def _active(
    b: _Builder, obs: Observation, status: FineTuneJobStatus, pod: PodView | None
) -> tuple[Phase, str, str]:
    if pod is None:
        message = _failed_create(b, obs)
        if message is not None:
            b.set(ConditionType.SCHEDULED, "False", "FailedCreate", message)
            return Phase.PENDING, "FailedCreate", message
        b.set(ConditionType.SCHEDULED, "Unknown", "PodCreating", "waiting for the training pod")
        return Phase.PENDING, "Pending", "waiting for the training pod"
    if pod.node is None:
        if pod.unschedulable is not None:
            diagnosis = obs.diagnosis or Diagnosis("Unschedulable", pod.unschedulable)
            b.set(ConditionType.SCHEDULED, "False", diagnosis.reason, diagnosis.message)
            return Phase.PENDING, diagnosis.reason, diagnosis.message
        b.set(ConditionType.SCHEDULED, "Unknown", "PodPending", "waiting for the scheduler")
        return Phase.PENDING, "Pending", "waiting for the scheduler"
    where = pod.node
    if obs.node is not None and obs.node.capability is not None:
        where += f" ({obs.node.capability} {obs.node.product})"
    bound = f"bound to node {where}"
    if obs.allocation is not None and obs.allocation.devices:
        bound += f", devices {', '.join(obs.allocation.refs)} (claim {obs.allocation.claim})"
    b.set(ConditionType.SCHEDULED, "True", "Bound", bound)
    return _on_node(b, obs, status, pod, where)


def _on_node(
    b: _Builder, obs: Observation, status: FineTuneJobStatus, pod: PodView, where: str
) -> tuple[Phase, str, str]:
    if pod.disruption is not None:  # the Job's pod failure policy: no retry is used
        message = disruption_message(pod)
        b.set(ConditionType.RUNNING, "False", "Disrupted", message)
        return Phase.PENDING, "Disrupted", message
    if pod.phase == "Running":
        status.start_time = status.start_time or pod.started_at or obs.now
        b.set(ConditionType.RUNNING, "True", "Training", f"training on {where}")
        return Phase.RUNNING, "Running", f"training on {where}"
    if pod.interrupted:  # the Job's pod failure policy: no retry is used
        message = (
            f"training pod stopped on SIGTERM ({pod.failure_message}); a replacement resumes "
            "from its checkpoint without using a retry"
        )
        b.set(ConditionType.RUNNING, "False", "Interrupted", message)
        return Phase.PENDING, "Interrupted", message
    if pod.phase == "Failed":  # a retryable failure; the Job controller starts another pod
        message = f"attempt failed, retrying: {pod.failure_message}"
        b.set(ConditionType.RUNNING, "False", "Retrying", message)
        return Phase.PENDING, "Retrying", message
    if pod.waiting_reason in STUCK_REASONS:
        detail = f": {pod.waiting_message}" if pod.waiting_message else ""
        message = f"training pod cannot start on {where}: {pod.waiting_reason}{detail}"
        b.set(ConditionType.RUNNING, "False", pod.waiting_reason or "", message)
        return Phase.PENDING, pod.waiting_reason or "", message
    return Phase.PENDING, "Starting", f"starting on {where}"
