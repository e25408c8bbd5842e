"""Kueue's side of a queued FineTuneJob: its Workload, read once into a typed view, and what the
FineTuneJob's status says about it (pure functions; the API calls are in kube.py).

Kueue's batch/v1 Job integration makes one Workload per Job (label kueue.x-k8s.io/job-uid). Its
conditions say where the job stands: QuotaReserved/Admitted False while it waits (with Kueue's
reason and message), True once admitted; Evicted (reason Preempted, InactiveWorkload, ...) when
Kueue took the quota back and suspended the Job; Finished at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api.resource import QueueStatus

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"
JOB_UID_LABEL = f"{GROUP}/job-uid"


@dataclass(frozen=True)
class KueueCondition:
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class WorkloadView:
    name: str
    queue: str
    active: bool
    conditions: dict[str, KueueCondition]
    cluster_queue: str | None
    flavors: tuple[str, ...]
    evictions: int

    @classmethod
    def from_api(cls, obj: dict[str, Any]) -> WorkloadView:
        """From a kueue.x-k8s.io/v1beta2 Workload as the API returns it (a dict)."""
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        conditions = {
            c["type"]: KueueCondition(
                c.get("status", "Unknown"),
                c.get("reason", ""),
                " ".join(c.get("message", "").split()),
            )
            for c in status.get("conditions") or []
        }
        admission = status.get("admission") or {}
        flavors: list[str] = []
        for assignment in admission.get("podSetAssignments") or []:
            for flavor in (assignment.get("flavors") or {}).values():
                if flavor not in flavors:
                    flavors.append(flavor)
        stats = status.get("schedulingStats") or {}
        return cls(
            name=obj["metadata"]["name"],
            queue=spec.get("queueName", ""),
            active=spec.get("active", True) is not False,
            conditions=conditions,
            cluster_queue=admission.get("clusterQueue"),
            flavors=tuple(flavors),
            evictions=sum(int(e.get("count", 0)) for e in stats.get("evictions") or []),
        )

    def true(self, type_: str) -> bool:
        condition = self.conditions.get(type_)
        return condition is not None and condition.status == "True"

    @property
    def admitted(self) -> bool:
        return self.true("Admitted")

    @property
    def finished(self) -> bool:
        return self.true("Finished")

    def queue_status(self, local_queue: str) -> QueueStatus:
        return QueueStatus(
            local_queue=local_queue,
            workload=self.name,
            cluster_queue=self.cluster_queue,
            flavors=list(self.flavors),
            evictions=self.evictions or None,
        )


@dataclass(frozen=True)
class Waiting:
    """Why a queued job does not run yet: (reason, message) for the phase and the condition."""

    reason: str
    message: str


def waiting(queue: str, workload: WorkloadView | None) -> Waiting | None:
    """None once Kueue admitted the Workload; else Kueue's reason, in the job's words."""
    if workload is None:
        return Waiting(
            "WaitingForWorkload",
            f"queued in LocalQueue {queue}: waiting for Kueue to create the Workload (is Kueue "
            "running with its batch/job integration?)",
        )
    if workload.admitted:
        return None
    evicted = workload.conditions.get("Evicted")
    reserved = workload.conditions.get("QuotaReserved")
    detail = reserved.message if reserved is not None and reserved.message else ""
    reason = reserved.reason if reserved is not None and reserved.reason else "Pending"
    text = f"queued in LocalQueue {queue}"
    if evicted is not None and evicted.status == "True":
        reason = evicted.reason or "Evicted"
        text += (
            f": evicted by Kueue ({evicted.reason}: {evicted.message}); the trainer saved a "
            "checkpoint and resumes from it when Kueue admits the job again"
        )
    elif detail:
        text += f": {detail}"
    else:
        text += ": waiting for Kueue to admit it"
    return Waiting(reason, text)


def admitted_message(workload: WorkloadView) -> str:
    flavors = ", ".join(workload.flavors) or "no flavor"
    return f"admitted by ClusterQueue {workload.cluster_queue} (flavor {flavors})"
