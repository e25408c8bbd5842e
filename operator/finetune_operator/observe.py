"""Typed views of the children the operator watches, parsed once from the API's objects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from finetune_api.trainer_config import EXIT_INVALID_INPUT, TrainerOutcome
from finetune_operator.builders import ANNOTATION_SPEC_HASH


def _time(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


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

    @classmethod
    def from_api(cls, pod: Any) -> PodView:
        """From a kubernetes.client V1Pod."""
        unschedulable = disruption = None
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False":
                unschedulable = condition.message or condition.reason or "unschedulable"
            if condition.type == "DisruptionTarget" and condition.status == "True":
                disruption = ": ".join(x for x in (condition.reason, condition.message) if x)
                disruption = disruption or "disrupted"
        started = finished = message = waiting_reason = waiting_message = None
        exit_code = None
        statuses = [
            *(pod.status.init_container_statuses or []),
            *(pod.status.container_statuses or []),
        ]
        for status in statuses:
            waiting = status.state.waiting if status.state else None
            if waiting is not None and waiting.reason and waiting_reason is None:
                waiting_reason = waiting.reason
                waiting_message = " ".join((waiting.message or "").split()) or None
        for status in pod.status.container_statuses or []:
            if status.state and status.state.running:
                started = _time(status.state.running.started_at)
            if status.state and status.state.terminated:
                terminated = status.state.terminated
                started = _time(terminated.started_at)
                finished = _time(terminated.finished_at)
                exit_code = terminated.exit_code
                message = terminated.message
        return cls(
            name=pod.metadata.name,
            created=_time(pod.metadata.creation_timestamp) or "",
            node=pod.spec.node_name,
            phase=pod.status.phase or "Pending",
            unschedulable=unschedulable,
            started_at=started or _time(pod.status.start_time),
            finished_at=finished,
            exit_code=exit_code,
            termination_message=message,
            disruption=disruption,
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
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

    @classmethod
    def from_api(cls, job: Any) -> JobView:
        """From a kubernetes.client V1Job."""
        complete_time = failed_reason = failed_message = failed_time = None
        for condition in job.status.conditions or []:
            if condition.status != "True":
                continue
            if condition.type == "Complete":
                complete_time = _time(condition.last_transition_time) or ""
            elif condition.type == "Failed":
                failed_reason = condition.reason or "JobFailed"
                failed_message = condition.message or ""
                failed_time = _time(condition.last_transition_time)
        annotations = job.metadata.annotations or {}
        return cls(
            name=job.metadata.name,
            uid=job.metadata.uid or "",
            spec_hash=annotations.get(ANNOTATION_SPEC_HASH),
            suspended=bool(job.spec.suspend),
            active=job.status.active or 0,
            failed=job.status.failed or 0,
            succeeded=job.status.succeeded or 0,
            complete_time=complete_time,
            failed_reason=failed_reason,
            failed_message=failed_message,
            failed_time=failed_time,
        )
