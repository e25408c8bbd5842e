"""Status derivation: phases, conditions, transitions, from observed children."""

from __future__ import annotations

import json
from typing import Any

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobStatus
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import Diagnosis, GpuNode, GpuRequirement
from finetune_operator.status import Observation, awaits_pod, derive

REQ = GpuRequirement("fp8", ComputeCapability(9, 0), None, True)
JOB = JobView("j-train", "h", 1, 1, 0, 0, None, None, None, None)
NODE = GpuNode("gpu-h100", ComputeCapability(9, 0), 81559, "NVIDIA-H100-80GB-HBM3")


def pod(phase: str = "Pending", node: str | None = None, **extra: Any) -> PodView:
    fields: dict[str, Any] = {
        "name": "p1", "created": "2026-01-01T00:00:00Z", "node": node, "phase": phase, "unschedulable": None,
        "started_at": None, "finished_at": None, "exit_code": None, "termination_message": None,
    }  # fmt: skip
    fields.update(extra)
    return PodView(**fields)


def obs(**extra: Any) -> Observation:
    fields: dict[str, Any] = {
        "generation": 1,
        "now": "2026-01-01T00:00:10Z",
        "requirement": REQ,
        "job": JOB,
        "adapter_uri": "pvc://o/a",
    }
    fields.update(extra)
    return Observation(**fields)


def conditions(status: FineTuneJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_invalid_spec() -> None:
    status, events = derive(
        FineTuneJobStatus(), Observation(generation=2, now="t", invalid="spec.x: bad")
    )
    assert status.phase == "Failed" and status.observed_generation == 2
    assert conditions(status)["Validated"] == ("False", "InvalidSpec")
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Warning", "InvalidSpec", "spec.x: bad")
    ]


def test_pending_without_job_then_unschedulable() -> None:
    status, _ = derive(FineTuneJobStatus(), obs(job=None))
    assert status.phase == "Pending" and conditions(status)["Scheduled"] == (
        "Unknown",
        "JobPending",
    )
    assert status.placement is not None and status.placement.required_compute_capability == "9.0"
    assert status.placement.architecture == "Hopper"
    diag = Diagnosis(
        "NoCompatibleGPU", "needs compute capability ≥ 9.0 (Hopper or newer); nodes: 1 × 8.0 A100"
    )
    status2, events = derive(status, obs(pods=(pod(unschedulable="0/1 nodes"),), diagnosis=diag))
    assert conditions(status2)["Scheduled"] == ("False", "NoCompatibleGPU")
    assert [e.reason for e in events] == ["NoCompatibleGPU"]
    # the same diagnosis again announces nothing new
    _, again = derive(status2, obs(pods=(pod(unschedulable="0/1 nodes"),), diagnosis=diag))
    assert again == []


def test_a_new_phase_and_a_condition_with_the_same_news_make_one_warning() -> None:
    """A job first seen unschedulable becomes Pending for NoCompatibleGPU: the phase's Normal
    Event and the Scheduled condition's Warning would say the same; only the Warning is posted."""
    diag = Diagnosis("NoCompatibleGPU", "needs compute capability ≥ 9.0; nodes: none")
    status, events = derive(
        FineTuneJobStatus(), obs(pods=(pod(unschedulable="0/1 nodes"),), diagnosis=diag)
    )
    assert status.phase == "Pending"
    assert [(e.type, e.reason) for e in events] == [("Warning", "NoCompatibleGPU")]
    # a phase whose reason no condition announces still gets its own Event
    _, plain = derive(FineTuneJobStatus(), obs(job=None))
    assert [(e.type, e.reason) for e in plain] == [("Normal", "Created")]


def test_running_records_node_and_start() -> None:
    status, events = derive(
        FineTuneJobStatus(phase="Pending"),
        obs(pods=(pod("Running", "gpu-h100", started_at="2026-01-01T00:00:05Z"),), node=NODE),
    )
    assert status.phase == "Running"
    assert status.start_time == "2026-01-01T00:00:05Z"
    assert status.placement is not None and status.placement.node == "gpu-h100"
    assert (
        status.placement.gpu_product == "NVIDIA-H100-80GB-HBM3"
        and status.placement.node_compute_capability == "9.0"
    )
    assert conditions(status)["Scheduled"] == ("True", "Bound")
    assert [e.reason for e in events] == ["Running"]


def test_transition_time_is_stable_while_status_holds() -> None:
    first, _ = derive(
        FineTuneJobStatus(), obs(pods=(pod("Running", "n"),), now="2026-01-01T00:00:10Z")
    )
    later, _ = derive(first, obs(pods=(pod("Running", "n"),), now="2026-01-01T01:00:00Z"))
    assert [c.last_transition_time for c in later.conditions] == [
        c.last_transition_time for c in first.conditions
    ]


def test_success_takes_the_result_from_the_termination_message() -> None:
    message = json.dumps(
        {
            "outcome": "Succeeded",
            "reason": "Completed",
            "result": {"adapter": "pvc://o/a", "steps": 9, "finalLoss": 0.5},
        }
    )
    done = pod(
        "Succeeded",
        "n",
        exit_code=0,
        termination_message=message,
        finished_at="2026-01-01T00:05:00Z",
    )
    status, events = derive(FineTuneJobStatus(phase="Running"), obs(pods=(done,)))
    assert status.phase == "Succeeded" and status.completion_time == "2026-01-01T00:05:00Z"
    assert status.result is not None and (status.result.steps, status.result.final_loss) == (9, 0.5)
    assert conditions(status)["Complete"] == ("True", "Completed")
    assert [(e.type, e.reason) for e in events] == [("Normal", "Completed")]


def test_success_without_message_still_names_the_adapter() -> None:
    job = JobView("j", "h", 1, 0, 0, 1, "2026-01-01T00:06:00Z", None, None, None)
    status, _ = derive(FineTuneJobStatus(), obs(job=job, pods=(pod("Succeeded", "n"),)))
    assert status.result is not None and status.result.adapter == "pvc://o/a"


def test_backoff_failure_uses_the_last_failed_pods_line() -> None:
    job = JobView(
        "j",
        "h",
        1,
        0,
        2,
        0,
        None,
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
        "t",
    )
    older = pod(
        "Failed",
        "n",
        name="p0",
        created="2026-01-01T00:00:00Z",
        exit_code=1,
        termination_message="old",
    )
    newer = pod(
        "Failed",
        "n",
        name="p1",
        created="2026-01-01T00:01:00Z",
        exit_code=1,
        termination_message="Traceback\nOOM at step 4\n",
    )
    status, events = derive(FineTuneJobStatus(phase="Running"), obs(job=job, pods=(older, newer)))
    assert status.phase == "Failed"
    assert conditions(status)["Failed"] == ("True", "BackoffLimitExceeded")
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert failed.message == "OOM at step 4"
    assert events[0].type == "Warning"


def test_invalid_input_fails_at_once_even_while_the_job_retries() -> None:
    message = json.dumps(
        {"outcome": "Failed", "reason": "InvalidInput", "message": "dataset d: file is empty"}
    )
    bad = pod("Failed", "n", name="p0", exit_code=2, termination_message=message)
    retry = pod("Pending", None, name="p1", created="2026-01-01T00:01:00Z")
    status, _ = derive(FineTuneJobStatus(phase="Running"), obs(pods=(bad, retry)))
    assert status.phase == "Failed" and conditions(status)["Failed"] == ("True", "InvalidInput")


def test_retryable_failure_waits_for_the_next_attempt() -> None:
    status, _ = derive(
        FineTuneJobStatus(phase="Running"),
        obs(pods=(pod("Failed", "n", exit_code=1, termination_message="flaky"),)),
    )
    assert status.phase == "Pending"
    assert conditions(status)["Running"] == ("False", "Retrying")


def test_a_pod_stopped_on_sigterm_waits_for_its_replacement_without_a_retry() -> None:
    """Exit 3: the trainer saved a checkpoint on SIGTERM (a deleted pod gets no DisruptionTarget);
    the Job's pod failure policy ignores it, and the status says so."""
    message = json.dumps(
        {
            "outcome": "Failed",
            "reason": "Interrupted",
            "message": "training stopped at step 40 of 300; a retry resumes from checkpoint-40",
        }
    )
    stopped = pod("Failed", "n", exit_code=3, termination_message=message)
    status, _ = derive(FineTuneJobStatus(phase="Running"), obs(pods=(stopped,)))
    assert status.phase == "Pending"
    assert conditions(status)["Running"] == ("False", "Interrupted")
    assert "stopped at step 40 of 300" in status.message
    assert "without using a retry" in status.message
    # Another failure with the same termination reason but a killed process is a retry.
    killed = pod("Failed", "n", exit_code=137, termination_message=message)
    status, _ = derive(FineTuneJobStatus(phase="Running"), obs(pods=(killed,)))
    assert conditions(status)["Running"] == ("False", "Retrying")


def test_deadline_exceeded() -> None:
    job = JobView(
        "j",
        "h",
        1,
        0,
        0,
        0,
        None,
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
        "t",
    )
    status, _ = derive(FineTuneJobStatus(phase="Running"), obs(job=job))
    assert conditions(status)["Failed"] == ("True", "DeadlineExceeded")


def test_suspend_and_spec_change() -> None:
    status, _ = derive(FineTuneJobStatus(phase="Running"), obs(suspend=True, spec_changed=True))
    assert status.phase == "Suspended"
    assert conditions(status)["Suspended"] == ("True", "Suspended")
    assert conditions(status)["SpecChanged"] == ("True", "SpecChangedAfterStart")
    resumed, _ = derive(status, obs(pods=(pod("Running", "n"),)))
    assert conditions(resumed)["Suspended"] == ("False", "Resumed")
    assert conditions(resumed)["SpecChanged"] == ("False", "SpecMatchesJob")


def test_pod_view_parses_termination_messages() -> None:
    assert pod(termination_message="not json\nlast words").failure_message == "last words"
    assert pod(exit_code=3).failure_message == "trainer exited with code 3"
    assert pod(exit_code=2).invalid_input
    assert not pod(
        exit_code=2,
        termination_message='{"outcome": "Failed", "reason": "TrainingError", "message": "x"}',
    ).invalid_input


def test_only_jobs_waiting_for_a_pod_nothing_announces_are_looked_at_periodically() -> None:
    """awaits_pod, on the statuses derive writes: no Job yet, a Job without a pod and a Job the
    Job controller cannot make a pod for (FailedCreate, known only from Events) are; a pod
    waiting for the scheduler, a running, suspended or finished job is not (their changes come
    as events of watched objects)."""

    def dumped(status: FineTuneJobStatus) -> dict[str, Any]:
        return status.model_dump(mode="json", by_alias=True, exclude_none=True)

    assert awaits_pod({})  # not looked at by the operator yet
    no_job, _ = derive(FineTuneJobStatus(), obs(job=None))
    no_pod, _ = derive(no_job, obs())
    refused = ("j-train", "FailedCreate", 'pods "j-train-x" is forbidden: exceeded quota')
    failed_create, _ = derive(no_pod, obs(job_events=(refused,)))
    assert conditions(failed_create)["Scheduled"] == ("False", "FailedCreate")
    for waiting in (no_job, no_pod, failed_create):
        assert awaits_pod(dumped(waiting)), waiting.conditions
    unscheduled, _ = derive(no_pod, obs(pods=(pod(),)))
    unschedulable, _ = derive(no_pod, obs(pods=(pod(unschedulable="0/1 nodes"),)))
    running, _ = derive(no_pod, obs(pods=(pod("Running", "gpu-h100"),), node=NODE))
    suspended, _ = derive(no_pod, obs(suspend=True))
    for announced in (unscheduled, unschedulable, running, suspended):
        assert not awaits_pod(dumped(announced)), announced.phase
