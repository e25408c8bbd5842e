"""Typed views of the children the operator watches, parsed once from the API server's JSON
(the kubernetes client's model classes cost more CPU to build than the whole reconciliation)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from finetune_api.trainer_config import EXIT_INTERRUPTED, EXIT_INVALID_INPUT, TrainerOutcome
from finetune_operator.builders import ANNOTATION_SPEC_HASH, LABEL_NAME

# The Job controller's annotation on each pod of an Indexed Job (a multi-node job).
ANNOTATION_INDEX = "batch.kubernetes.io/job-completion-index"


def outcome_from_message(message: str | None) -> TrainerOutcome | None:
    """The trainer's termination message as a TrainerOutcome, if it is one."""
    if not message:
        return None
    try:
        return TrainerOutcome.model_validate(json.loads(message))
    except (ValueError, ValidationError):
        return None


def last_line(message: str | None) -> str:
    """The last non-empty line of a termination message or log tail."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class PodView:
    name: str
    created: str
    node: str | None
    phase: str
    unschedulable: str | None  # the scheduler's message while it cannot place the pod
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    termination_message: str | None
    disruption: str | None = None  # why the pod was disrupted (evicted, preempted, drained)
    waiting_reason: str | None = None  # a container waiting to start: ImagePullBackOff, ...
    waiting_message: str | None = None
    claims: tuple[str, ...] = ()  # the ResourceClaims Kubernetes made for the pod (DRA)
    index: int | None = None  # completion index in a multi-node job (0 runs rank 0)

    @classmethod
    def from_api(cls, pod: Mapping[str, Any]) -> PodView:
        """From a Pod as the API server sends it (JSON, camelCase)."""
        status = pod.get("status") or {}
        unschedulable = disruption = None
        for condition in status.get("conditions") or []:
            kind, true = condition.get("type"), condition.get("status") == "True"
            if kind == "PodScheduled" and not true:
                unschedulable = condition.get("message") or condition.get("reason")
                unschedulable = unschedulable or "unschedulable"
            if kind == "DisruptionTarget" and true:
                parts = (condition.get("reason"), condition.get("message"))
                disruption = ": ".join(x for x in parts if x) or "disrupted"
        started = finished = message = waiting_reason = waiting_message = None
        exit_code = None
        containers = status.get("containerStatuses") or []
        for container in [*(status.get("initContainerStatuses") or []), *containers]:
            waiting = (container.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") and waiting_reason is None:
                waiting_reason = waiting["reason"]
                waiting_message = " ".join((waiting.get("message") or "").split()) or None
        for container in containers:
            state = container.get("state") or {}
            if state.get("running"):
                started = state["running"].get("startedAt")
            if state.get("terminated"):
                terminated = state["terminated"]
                started = terminated.get("startedAt")
                finished = terminated.get("finishedAt")
                exit_code = terminated.get("exitCode")
                message = terminated.get("message")
        meta = pod["metadata"]
        index = (meta.get("annotations") or {}).get(ANNOTATION_INDEX)
        return cls(
            index=int(index) if index is not None and index.isdigit() else None,
            name=meta["name"],
            created=meta.get("creationTimestamp") or "",
            node=(pod.get("spec") or {}).get("nodeName"),
            phase=status.get("phase") or "Pending",
            unschedulable=unschedulable,
            started_at=started or status.get("startTime"),
            finished_at=finished,
            exit_code=exit_code,
            termination_message=message,
            disruption=disruption,
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            claims=tuple(
                c["resourceClaimName"]
                for c in status.get("resourceClaimStatuses") or []
                if c.get("resourceClaimName")
            ),
        )

    @property
    def outcome(self) -> TrainerOutcome | None:
        return outcome_from_message(self.termination_message)

    @property
    def failure_message(self) -> str:
        """The trainer's one-line reason for a failed pod."""
        outcome = self.outcome
        if outcome is not None and outcome.message:
            return outcome.message
        line = last_line(self.termination_message)
        return line or f"trainer exited with code {self.exit_code}"

    @property
    def interrupted(self) -> bool:
        """The trainer stopped on SIGTERM after saving a checkpoint (no retry is used)."""
        return self.phase == "Failed" and self.exit_code == EXIT_INTERRUPTED

    @property
    def invalid_input(self) -> bool:
        """The trainer said retrying cannot help (bad spec, data, model or hardware)."""
        outcome = self.outcome
        if outcome is not None:
            return outcome.reason == "InvalidInput"
        return self.exit_code == EXIT_INVALID_INPUT


@dataclass(frozen=True)
class JobView:
    name: str
    spec_hash: str | None
    suspended: bool
    active: int
    failed: int
    succeeded: int
    complete_time: str | None
    failed_reason: str | None
    failed_message: str | None
    failed_time: str | None
    uid: str = ""
    completions: int = 1  # pods that must succeed: resources.nodes
    owner: str = ""  # the FineTuneJob's name (the operator's annotation on its children)

    @classmethod
    def from_api(cls, job: Mapping[str, Any]) -> JobView:
        """From a Job as the API server sends it (JSON, camelCase)."""
        complete_time = failed_reason = failed_message = failed_time = None
        status = job.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("status") != "True":
                continue
            if condition.get("type") == "Complete":
                complete_time = condition.get("lastTransitionTime") or ""
            elif condition.get("type") == "Failed":
                failed_reason = condition.get("reason") or "JobFailed"
                failed_message = condition.get("message") or ""
                failed_time = condition.get("lastTransitionTime")
        meta = job["metadata"]
        return cls(
            name=meta["name"],
            uid=meta.get("uid") or "",
            completions=(job.get("spec") or {}).get("completions") or 1,
            spec_hash=(meta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH),
            owner=(meta.get("annotations") or {}).get(LABEL_NAME) or "",
            suspended=bool((job.get("spec") or {}).get("suspend")),
            active=status.get("active") or 0,
            failed=status.get("failed") or 0,
            succeeded=status.get("succeeded") or 0,
            complete_time=complete_time,
            failed_reason=failed_reason,
            failed_message=failed_message,
            failed_time=failed_time,
        )
