"""Children that fail to be created, go missing, or never start a pod (issue 14): the status says
so, with the API server's or the kubelet's own message, and a finished job is never run again."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace
from typing import Any, cast

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobStatus
from finetune_operator import tuning
from finetune_operator.builders import LABEL_NAME, LABEL_UID
from finetune_operator.children import ChildFailure
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import GpuNode, GpuRequirement
from finetune_operator.reconcile import Reconciler, Seen
from finetune_operator.settings import Settings
from finetune_operator.status import Observation, derive, finished

REQ = GpuRequirement("bnb-4bit", ComputeCapability(8, 0), None, True)
JOB = JobView("j-train", "h", False, 0, 0, 0, None, None, None, None)
DONE = JobView("j-train", "h", False, 0, 0, 1, "2026-01-01T01:00:00Z", None, None, None)
REFUSED = ChildFailure(
    "Job", "j-train", 422,
    'Job.batch "j-train" is invalid: spec.template.spec.tolerations[1].operator: Invalid value: '
    '"Exists": value must be empty when `operator` is \'Exists\'',
)  # fmt: skip
QUOTA = ChildFailure(
    "Job", "j-train", 403, 'jobs.batch "j-train" is forbidden: exceeded quota: jobs, requested: '
    "count/jobs.batch=1, used: count/jobs.batch=1, limited: count/jobs.batch=1",
)  # fmt: skip


def pod(phase: str = "Pending", node: str | None = "gpu-a100", **extra: Any) -> PodView:
    fields: dict[str, Any] = {
        "name": "p1", "created": "2026-01-01T00:00:00Z", "node": node, "phase": phase, "unschedulable": None,
        "started_at": None, "finished_at": None, "exit_code": None, "termination_message": None,
    }  # fmt: skip
    fields.update(extra)
    return PodView(**fields)


def obs(**extra: Any) -> Observation:
    fields: dict[str, Any] = {"generation": 1, "now": "t1", "requirement": REQ, "job": JOB}
    fields.update(extra)
    return Observation(**fields)


def conditions(status: FineTuneJobStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in status.conditions}


def test_a_finished_job_stays_finished_whatever_an_observation_says() -> None:
    """Succeeded and Failed (by the run) are final: a pod's earlier state seen late must not
    turn the job back into Pending or Running (a later pass would then train it again)."""
    ran = pod("Running", started_at="2026-01-01T00:00:05Z")
    done = pod("Succeeded", started_at="2026-01-01T00:00:05Z", finished_at="2026-01-01T00:09:00Z")
    succeeded, _ = derive(FineTuneJobStatus(), obs(pods=(done,), adapter_uri="pvc://out/a"))
    assert succeeded.phase == "Succeeded" and finished(succeeded)
    for late in (ran, pod("Pending")):
        again, events = derive(succeeded, obs(pods=(late,), now="t2"))
        assert again.phase == "Succeeded" and finished(again)
        assert conditions(again)["Complete"][0] == "True"
        assert conditions(again).get("Running", ("False",))[0] != "True"
        assert events == []
    crashed = pod("Failed", exit_code=3, termination_message="boom")
    failed, _ = derive(
        FineTuneJobStatus(),
        obs(job=replace(JOB, failed_reason="BackoffLimitExceeded"), pods=(crashed,)),
    )
    assert failed.phase == "Failed" and finished(failed)
    again, events = derive(failed, obs(pods=(ran,), now="t2"))
    assert again.phase == "Failed" and events == []


def test_refused_child_fails_the_job_naming_the_child_and_the_api_servers_message() -> None:
    status, events = derive(FineTuneJobStatus(), obs(job=None, child_failure=REFUSED))
    assert status.phase == "Failed"
    state, reason, message = conditions(status)["ChildrenReady"]
    assert (state, reason) == ("False", "ChildRejected")
    assert message.startswith('Job j-train refused: Job.batch "j-train" is invalid: ')
    assert "value must be empty" in message
    assert conditions(status)["Failed"][:2] == ("True", "ChildRejected")
    assert ("Warning", "ChildRejected") in [(e.type, e.reason) for e in events]
    assert not finished(status)  # no Job ever existed: fixing the spec starts one


def test_child_refused_for_a_passing_reason_stays_pending_and_says_it_retries() -> None:
    status, events = derive(FineTuneJobStatus(), obs(job=None, child_failure=QUOTA))
    assert status.phase == "Pending"
    state, reason, message = conditions(status)["ChildrenReady"]
    assert (state, reason) == ("False", "ChildCreateFailed")
    assert "could not be created yet (retrying): " in message and "exceeded quota" in message
    assert "Failed" not in conditions(status)
    assert [e.reason for e in events if e.type == "Warning"] == ["ChildCreateFailed"]
    # once created, the condition turns True and the job goes on
    fixed, _ = derive(status, obs())
    assert conditions(fixed)["ChildrenReady"][:2] == ("True", "Created")
    assert fixed.phase == "Pending"


def test_fixed_spec_after_refusal_clears_failed() -> None:
    refused, _ = derive(FineTuneJobStatus(), obs(job=None, child_failure=REFUSED))
    fixed, _ = derive(refused, obs(generation=2, job=None))
    assert fixed.phase == "Pending"
    assert conditions(fixed)["Failed"][:2] == ("False", "SpecFixed")


def test_deleted_job_of_a_running_job_clears_running() -> None:
    running, _ = derive(
        FineTuneJobStatus(), obs(pods=(pod("Running", started_at="2026-01-01T00:00:05Z"),))
    )
    assert conditions(running)["Running"][0] == "True"
    gone, _ = derive(running, obs(job=None))
    assert gone.phase == "Pending"
    assert conditions(gone)["Running"][:2] == ("False", "JobPending")


def test_finished_job_whose_job_is_deleted_stays_finished() -> None:
    done, _ = derive(FineTuneJobStatus(), obs(job=DONE, pods=(pod("Succeeded"),)))
    assert done.phase == "Succeeded" and finished(done)
    gone, events = derive(done, obs(job=None))
    assert gone.phase == "Succeeded"
    assert gone.message == done.message
    assert conditions(gone)["Complete"][:2] == ("True", "Completed")
    assert "Running" not in conditions(gone) or conditions(gone)["Running"][0] == "False"
    state, reason, message = conditions(gone)["ChildrenReady"]
    assert (state, reason) == ("False", "JobDeletedAfterFinish")
    assert (
        "j-train was deleted after the job finished; a finished job is never run again" in message
    )
    assert [(e.type, e.reason) for e in events] == [("Warning", "JobDeletedAfterFinish")]
    again, events = derive(gone, obs(job=None))
    assert again.phase == "Succeeded" and events == []  # reported once


def test_failed_create_events_of_the_job_explain_a_missing_pod() -> None:
    message = 'pods "j-train-x" is forbidden: no PriorityClass with name does-not-exist was found'
    status, events = derive(
        FineTuneJobStatus(),
        obs(job_events=(("2026-01-01T00:00:01Z", "FailedCreate", message),)),
    )
    assert status.phase == "Pending"
    assert conditions(status)["Scheduled"] == (
        "False", "FailedCreate", f"the Job controller cannot create the training pod: {message}"
    )  # fmt: skip
    assert status.message is not None and "does-not-exist" in status.message
    assert [(e.type, e.reason) for e in events if e.type == "Warning"] == [
        ("Warning", "FailedCreate")
    ]


@pytest.mark.parametrize(
    ("reason", "message", "shown"),
    [
        (
            "CreateContainerConfigError",
            'secret "hf-token" not found',
            'secret "hf-token" not found',
        ),
        ("ImagePullBackOff", 'Back-off pulling image "trainer:nope"', '"trainer:nope"'),
        ("ErrImagePull", "rpc error: manifest unknown", "manifest unknown"),
        ("InvalidImageName", 'Failed to apply default image tag " x"', "default image tag"),
    ],
)
def test_pod_that_cannot_start_says_why(reason: str, message: str, shown: str) -> None:
    status, events = derive(
        FineTuneJobStatus(),
        obs(pods=(pod(waiting_reason=reason, waiting_message=message),)),
    )
    assert status.phase == "Pending"
    state, got_reason, got = conditions(status)["Running"]
    assert (state, got_reason) == ("False", reason)
    assert got.startswith(f"training pod cannot start on gpu-a100: {reason}: ") and shown in got
    assert status.message == got
    assert [(e.type, e.reason) for e in events if e.type == "Warning"] == [("Warning", reason)]


def test_container_creating_is_just_starting() -> None:
    status, events = derive(
        FineTuneJobStatus(), obs(pods=(pod(waiting_reason="ContainerCreating"),))
    )
    assert status.message == "starting on gpu-a100"
    assert not [e for e in events if e.type == "Warning"]


def test_pod_view_reads_waiting_reason() -> None:
    raw = {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "n", "containers": [{"name": "trainer"}]},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "trainer", "image": "i", "imageID": "", "ready": False,
                 "restartCount": 0, "state": {"waiting": {
                     "reason": "CreateContainerConfigError",
                     "message": 'secret "hf-token" not found'}}}
            ],
        },
    }  # fmt: skip

    view = PodView.from_api(json.loads(json.dumps(raw)))
    assert (view.waiting_reason, view.waiting_message) == (
        "CreateContainerConfigError", 'secret "hf-token" not found'
    )  # fmt: skip


# --- all or nothing: the reconciler against a fake API server ---------------------------------


class FakeKube:
    """Records creates and deletes; refuses the kinds in `refuse` with the given status."""

    def __init__(self, refuse: dict[str, int] | None = None):
        self.refuse = refuse or {}
        self.objects: dict[tuple[str, str], Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.status: dict[str, Any] | None = None
        self.warnings: dict[str, list[tuple[str, str, str]]] = {}
        self.caches: dict[str, Seen] = {}  # what the watch caches hold, by FineTuneJob name

    def create_if_missing(self, obj: Any) -> bool:
        kind = type(obj).__name__.removeprefix("V1")
        self.calls.append(("create", kind))
        if kind in self.refuse:
            body = json.dumps({"message": f"{kind} refused: field x is bad"})
            exc = ApiException(status=self.refuse[kind], reason="Unprocessable Entity")
            exc.body = body
            raise exc
        key = (kind, obj.metadata.name)
        if key in self.objects:
            return False
        self.objects[key] = obj
        return True

    def delete(self, obj: Any) -> None:
        kind = type(obj).__name__.removeprefix("V1")
        self.calls.append(("delete", kind))
        self.objects.pop((kind, obj.metadata.name), None)

    def job_exists(self, namespace: str, name: str) -> bool:
        self.calls.append(("get", "Job"))
        return ("Job", name) in self.objects

    def job_warnings(self, namespace: str) -> dict[str, list[tuple[str, str, str]]]:
        self.calls.append(("list", "Event"))
        return self.warnings

    def patch_finetunejob_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.status = status


def body(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {
            "dataset": {"claimName": "data", "path": "t.jsonl"},
            "output": {"claimName": "out", "path": "a"},
        },
        "status": status or {},
    }


IDENTITY = [
    ("Role", "finetune-trainer"),
    ("RoleBinding", "finetune-trainer"),
    ("ServiceAccount", "finetune-trainer"),
]


def reconciler(kube: FakeKube) -> tuple[Reconciler, list[tuple[str, str, str]]]:
    events: list[tuple[str, str, str]] = []
    return Reconciler(
        Settings(),
        kube,
        lambda _b, t, r, m: events.append((t, r, m)),  # type: ignore[arg-type]
        lambda _namespace, name: kube.caches.get(name, Seen()),
    ), events


def test_a_refused_job_leaves_no_child_behind() -> None:
    kube = FakeKube(refuse={"Job": 422})
    rec, events = reconciler(kube)
    failure = rec.reconcile(body())
    assert failure is not None and failure.permanent
    assert failure.describe() == "Job j-train refused: Job refused: field x is bad"
    # The namespace's trainer identity is shared by its jobs: what of it was made stays (the
    # refusal may stop the RoleBinding, which waits for the Role, before it is sent)...
    assert {kind for kind, _ in kube.objects} <= {kind for kind, _ in IDENTITY}
    assert ("ServiceAccount", "finetune-trainer") in kube.objects  # the Job waited for it
    assert [kind for call, kind in kube.calls if call == "delete"] == []
    assert kube.status is not None and kube.status["phase"] == "Failed"
    assert ("Warning", "ChildRejected", failure.describe()) in events
    # ...and the next pass, its Job accepted, makes the rest of it.
    kube.refuse = {}
    assert rec.reconcile(body()) is None
    assert sorted(k for k in kube.objects if k[0] != "Job") == IDENTITY
    assert ("Job", "j-train") in kube.objects


def test_a_child_refused_in_the_first_round_stops_the_pass_before_the_job() -> None:
    """The ServiceAccount is refused (a quota), and its answer comes last: the Job waits for it."""
    kube = FakeKube(refuse={"ServiceAccount": 403})
    real_create = kube.create_if_missing

    def create(obj: Any) -> bool:
        if type(obj).__name__ == "V1ServiceAccount":
            time.sleep(0.3)  # the Role is long answered
        return real_create(obj)

    kube.create_if_missing = create  # type: ignore[method-assign]
    rec, _ = reconciler(kube)
    failure = rec.reconcile(body())
    assert failure is not None and not failure.permanent
    assert set(kube.objects) <= set(IDENTITY)  # no Job; the identity's other parts stay (shared)
    assert ("create", "Job") not in kube.calls  # the Job waits for the ServiceAccount's answer
    assert kube.status is not None and kube.status["phase"] == "Pending"


def test_missing_children_are_made_again_but_never_for_a_finished_job() -> None:
    kube = FakeKube()
    rec, _ = reconciler(kube)
    assert rec.reconcile(body()) is None
    assert len(kube.objects) == 4  # the Job and the namespace's trainer identity
    del kube.objects[("Job", "j-train")]
    assert rec.reconcile(body()) is None
    assert ("Job", "j-train") in kube.objects
    del kube.objects[("Job", "j-train")]
    done = {"phase": "Succeeded", "jobName": "j-train", "message": "adapter written"}
    kube.calls.clear()
    assert rec.reconcile(body(done)) is None
    assert kube.calls == []  # nothing created, nothing even tried
    assert ("Job", "j-train") not in kube.objects
    assert kube.status is not None and kube.status["phase"] == "Succeeded"


def test_deletions_of_a_rolled_back_pass_do_not_retry_at_event_speed() -> None:
    """Undoing a refused pass deletes children; their DELETED events must not start another pass
    (that would loop as fast as events arrive). kopf's retry and a spec change still do."""
    kube = FakeKube(refuse={"Job": 403})
    rec, _ = reconciler(kube)
    two_nodes = body()
    two_nodes["spec"]["resources"] = {"nodes": 2}  # a headless Service for the workers too
    assert rec.reconcile(two_nodes) is not None
    assert kube.status is not None
    # Each undone child is recognised once, by its DELETED event; other deletions are not.
    assert rec.undone("Service", "ns", "j-workers")
    assert not rec.undone("Service", "ns", "j-workers")
    assert not rec.undone("ServiceAccount", "ns", "finetune-trainer")  # shared, never undone
    assert not rec.undone("Service", "ns", "other")
    refused = body(kube.status)
    kube.get_finetunejob = lambda namespace, name: refused  # type: ignore[attr-defined]
    kube.calls.clear()
    kube.status = None
    rec.refresh("ns", "j", heal="deleted")
    assert kube.calls == [] and kube.status is None  # nothing tried, the status left as it is
    rec.refresh("ns", "j", heal=True)  # the periodic check does retry a passing refusal
    assert ("create", "Job") in kube.calls


ACTIVE_JOB = JobView.from_api(
    {"metadata": {"name": "j-train", "uid": "jid"}, "status": {"active": 1}}
)


def running_pod() -> dict[str, Any]:
    """A Job's pod as the API server returns it: bound to gpu-a100, its container running."""
    return {
        "metadata": {"name": "j-train-abc", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "gpu-a100"},
        "status": {"phase": "Running", "containerStatuses": [
            {"state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}}}
        ]},
    }  # fmt: skip


def test_a_refresh_reads_the_watch_caches_not_the_api_server() -> None:
    """Seen carries the Job, the pods (any uid: only the FineTuneJob's own count) and the node
    the newest pod is bound to; the refresh asks the API server for nothing but the object."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    job = ACTIVE_JOB
    pod = running_pod()
    stale = {
        **pod,
        "metadata": {"name": "j-train-old", "creationTimestamp": "2026-01-02T00:00:00Z"},
    }
    a100 = GpuNode("gpu-a100", ComputeCapability(8, 0), 81920, "NVIDIA-A100-SXM4-80GB")
    other = GpuNode("gpu-t4", ComputeCapability(7, 5), 15360, "Tesla-T4")
    seen = Seen.collect(
        job,
        [("u1", PodView.from_api(pod)), ("old-uid", PodView.from_api(stale))],
        {"gpu-a100": [a100], "gpu-t4": [other]},
    )
    assert seen.nodes == (a100,)  # the bound pod's node only
    kube.get_finetunejob = lambda namespace, name: body()  # type: ignore[attr-defined]
    rec.refresh("ns", "j", seen)
    assert kube.calls == []
    assert kube.status is not None and kube.status["phase"] == "Running"
    assert kube.status["placement"]["node"] == "gpu-a100"
    assert kube.status["placement"]["gpuProduct"] == "NVIDIA-A100-SXM4-80GB"


def test_a_pass_never_derives_from_a_snapshot_older_than_the_last_pass_used() -> None:
    """Two refreshes of one job: the first is handed a snapshot while the pod is still pending,
    but waits, and the second, with the snapshot of the running pod, runs first. The waiting one
    must look again: deriving from its own snapshot would move the status back (and, were the
    job finished, have a later pass train it again)."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    job = ACTIVE_JOB
    running = running_pod()
    pending = {**running, "status": {"phase": "Pending"}}
    older = Seen.collect(job, [("u1", PodView.from_api(pending))], None, taken=1)
    newer = Seen.collect(job, [("u1", PodView.from_api(running))], None, taken=2)
    kube.caches["j"] = replace(newer, taken=3)  # what a new look finds
    written: list[str] = []

    def patch(_namespace: str, _name: str, status: dict[str, Any]) -> None:
        written.append(status["phase"])
        kube.status = status

    kube.patch_finetunejob_status = patch  # type: ignore[method-assign]
    kube.get_finetunejob = lambda namespace, name: body(kube.status)  # type: ignore[attr-defined]
    rec.refresh("ns", "j", newer)
    rec.refresh("ns", "j", older)
    assert written == ["Running"]
    # In order, each pass uses its own snapshot: no look.
    kube.caches.clear()
    rec.forget("ns", "j")
    kube.status, written[:] = None, []
    rec.refresh("ns", "j", older)
    rec.refresh("ns", "j", newer)
    assert written == ["Pending", "Running"]


def test_an_unschedulable_pod_is_explained_from_every_cached_gpu_node() -> None:
    pod = {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"conditions": [{"type": "PodScheduled", "status": "False",
                                   "message": "0/1 nodes are available"}]},
    }  # fmt: skip
    t4 = GpuNode("gpu-t4", ComputeCapability(7, 5), 15360, "Tesla-T4")
    seen = Seen.collect(None, [("u1", PodView.from_api(pod))], {"gpu-t4": [t4]})
    assert seen.nodes == (t4,)
    assert Seen.collect(None, [("u1", PodView.from_api(pod))], None).nodes == ()


def test_the_role_binding_and_the_job_come_after_what_they_need() -> None:
    """The API server refuses to bind a Role that does not exist yet (it checks that the operator
    holds what the binding grants); the Job's pods need their ServiceAccount. Nothing else waits:
    the Job goes out as soon as its ServiceAccount exists."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    assert rec.reconcile(body()) is None
    creates = [kind for call, kind in kube.calls if call == "create"]
    assert sorted(creates) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    assert creates.index("Job") > creates.index("ServiceAccount")
    assert creates.index("RoleBinding") > creates.index("Role")


def test_a_refused_service_account_stops_the_job_and_undoes_the_rest() -> None:
    kube = FakeKube(refuse={"ServiceAccount": 403})
    rec, _ = reconciler(kube)
    failure = rec.reconcile(body())
    assert failure is not None and failure.kind == "ServiceAccount"
    assert ("create", "Job") not in kube.calls
    assert set(kube.objects) <= {("Role", "finetune-trainer"), ("RoleBinding", "finetune-trainer")}
    # (no Job); the next pass tries the identity again
    kube.refuse.clear()
    kube.calls.clear()
    assert rec.reconcile(body()) is None
    assert ("create", "ServiceAccount") in kube.calls and ("Job", "j-train") in kube.objects


def test_the_trainer_identity_is_made_once_per_namespace() -> None:
    """The first job of a namespace makes its trainer identity; the next ones only their
    Job. Each pod runs as the namespace's account."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    assert rec.reconcile(body()) is None
    kube.calls.clear()
    second = body()
    second["metadata"].update(name="k", uid="u2")
    assert rec.reconcile(second) is None
    assert [kind for call, kind in kube.calls if call == "create"] == ["Job"]
    assert kube.objects[("Job", "k-train")].spec.template.spec.service_account_name == (
        "finetune-trainer"
    )
    other = body()
    other["metadata"].update(name="j", namespace="other", uid="u3")
    kube.calls.clear()
    assert rec.reconcile(other) is None  # (FakeKube keys objects by kind and name only)
    assert ("create", "ServiceAccount") in kube.calls


def test_a_deleted_identity_is_made_again() -> None:
    kube = FakeKube()
    rec, _ = reconciler(kube)
    assert rec.reconcile(body()) is None
    del kube.objects[("RoleBinding", "finetune-trainer")]
    rec.identity_lost("ns")
    assert ("RoleBinding", "finetune-trainer") in kube.objects
    kube.refuse["ServiceAccount"] = 403  # the namespace going away: the next job tries again
    del kube.objects[("ServiceAccount", "finetune-trainer")]
    rec.identity_lost("ns")
    kube.refuse.clear()
    kube.calls.clear()
    second = body()
    second["metadata"].update(name="k", uid="u2")
    assert rec.reconcile(second) is None
    assert ("ServiceAccount", "finetune-trainer") in kube.objects
    rec.forget("ns", "j")
    rec.forget("ns", "k")
    del kube.objects[("Role", "finetune-trainer")]
    rec.identity_lost("ns")  # no job left in the namespace: not made again until the next one
    assert ("Role", "finetune-trainer") not in kube.objects


def test_the_periodic_check_lists_events_once_and_refreshes_only_jobs_with_news() -> None:
    """Jobs waiting for a pod: one Event listing for the namespace; a job whose Job the Job
    controller cannot make a pod for gets FailedCreate, the others are left alone, and one
    without a Job gets it made again."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    view = JobView.from_api({"metadata": {"name": "j-train"}})
    quiet = JobView.from_api({"metadata": {"name": "other-train"}})
    kube.warnings = {"j-train": [("2026-01-01T00:00:01Z", "FailedCreate", "pods is forbidden")]}
    kube.get_finetunejob = lambda namespace, name: body()  # type: ignore[attr-defined]
    rec.tick("ns", [("j", Seen(job=view)), ("other", Seen(job=quiet))])
    assert kube.calls == [("list", "Event")]
    assert kube.status is not None
    scheduled = next(c for c in kube.status["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["reason"], kube.status["phase"]) == ("FailedCreate", "Pending")
    assert scheduled["message"].endswith("pods is forbidden")
    kube.calls.clear()
    # No Job, but no pass has run for j in this operator yet (a burst kopf is working through,
    # or a restart): its create or resume handler makes it; a heal now would do that twice.
    rec.tick("ns", [("j", Seen())])
    assert kube.calls == []
    rec.reconcile(body())  # kopf's handler ran: the children exist
    kube.calls.clear()
    rec.tick("ns", [("j", Seen())])  # the caches lag behind the Job just made: nothing to heal
    assert kube.calls == [("get", "Job")]
    kube.objects.pop(("Job", "j-train"))
    kube.calls.clear()
    rec.tick("ns", [("j", Seen())])  # the Job is gone: made again, no Events needed
    assert ("create", "Job") in kube.calls and ("list", "Event") not in kube.calls


def _started_by_kopfs_scheduler(limit: Any, put_in_force_after: int | None = None) -> list[int]:
    """How many of 6 blocked workers kopf's own scheduler had running, after each spawn: the
    limit is put in force after `put_in_force_after` spawns (never if None)."""
    from kopf._cogs.aiokits.aiotasks import Scheduler

    async def main() -> list[int]:
        scheduler = Scheduler(limit=limit)
        release = asyncio.Event()
        running: list[int] = []
        started = 0

        async def worker() -> None:
            nonlocal started
            started += 1
            await release.wait()

        for spawned in range(6):
            if spawned == put_in_force_after:
                limit.in_force = True
            await scheduler.spawn(worker())
            for _ in range(5):
                await asyncio.sleep(0)
            running.append(started)
        release.set()
        await scheduler.wait()
        running.append(started)  # every worker ran in the end
        await scheduler.close()
        return running

    return asyncio.run(main())


def test_kopfs_worker_limit_holds_only_once_the_operator_is_indexed() -> None:
    """kopf's first listing runs every object's worker at once (with indices each one waits until
    every object is indexed: a limit below the number of objects, 1,000 GPU nodes, never let the
    rest start, and the operator handled nothing); from the first handler on, kopf's own
    scheduler runs at most the limit at once per watch stream, and the rest wait their turn."""
    settings = kopf.OperatorSettings()
    tuning.tune(settings, "nvidia.com/gpu.compute.major")
    limit = settings.queueing.worker_limit
    assert isinstance(limit, tuning.WorkerLimit) and not limit.in_force
    assert limit.limit == tuning.WORKER_LIMIT
    assert settings.queueing.idle_timeout < 1
    assert _started_by_kopfs_scheduler(tuning.WorkerLimit(2)) == [1, 2, 3, 4, 5, 6, 6]
    assert _started_by_kopfs_scheduler(tuning.WorkerLimit(2), 3) == [1, 2, 3, 3, 3, 3, 6]
    assert _started_by_kopfs_scheduler(tuning.WorkerLimit(2), 0) == [1, 2, 2, 2, 2, 2, 6]


def test_the_first_handler_puts_the_worker_limit_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_operator import handlers

    limit = tuning.WorkerLimit(2)
    monkeypatch.setattr(handlers, "_state", {"workers": limit})
    indices = {"training_jobs": {}, "training_pods": {}, "gpu_nodes": {}}

    async def main() -> None:
        handlers._keep_indices(indices)

    assert not limit.in_force
    asyncio.run(main())
    assert limit.in_force


def test_the_last_handled_spec_is_kept_in_memory_not_on_the_object() -> None:
    """kopf's diff base is the spec alone, kept by uid in the operator: a status or metadata
    change is no change, a spec change is, nothing is written onto the FineTuneJob, and a
    deleted job's spec is dropped."""
    settings = kopf.OperatorSettings()
    specs = tuning.tune(settings)
    assert settings.persistence.diffbase_storage is specs

    def ftj(spec: dict[str, Any], **extra: Any) -> kopf.Body:
        raw = {"metadata": {"name": "j", "uid": "u1", "labels": {"a": "b"}}, "spec": spec}
        return kopf.Body(cast(Any, {**raw, **extra}))

    first = ftj({"model": {"name": "m"}})
    assert specs.fetch(body=first) is None  # new to this operator: kopf's create (or resume)
    patch = kopf.Patch()
    specs.store(body=first, patch=patch, essence=specs.build(body=first))
    assert not patch  # nothing written onto the object
    assert specs.fetch(body=first) == {"spec": {"model": {"name": "m"}}}
    status_only = ftj({"model": {"name": "m"}}, status={"phase": "Running"})
    assert specs.build(body=status_only) == specs.fetch(body=status_only)
    changed = ftj({"model": {"name": "n"}})
    assert specs.build(body=changed) != specs.fetch(body=changed)
    # kopf's retry records (annotations) are no spec change either, through its clearing step
    progress = settings.persistence.progress_storage
    retrying = ftj({"model": {"name": "m"}})
    retrying["metadata"]["annotations"] = {"finetune.dev/reconcile": '{"retries": 1}'}
    cleared = [
        progress.clear(essence=e) for e in (specs.build(body=retrying), specs.fetch(body=retrying))
    ]
    assert cleared[0] == cleared[1] == {"spec": {"model": {"name": "m"}}}
    specs.forget("u1")
    assert specs.fetch(body=first) is None and len(specs) == 0


def test_kopfs_marker_goes_only_with_a_progress_record_that_stays() -> None:
    """A handler that succeeds at once leaves nothing to write onto the FineTuneJob (kopf's own
    storage would still write its `kopf-managed` marker: a PATCH per new job); a retry's record
    keeps the marker with it."""
    settings = kopf.OperatorSettings()
    tuning.tune(settings)
    storage = settings.persistence.progress_storage
    body = kopf.Body(cast(Any, {"metadata": {"name": "j", "uid": "u1"}}))
    handler = kopf.HandlerId("reconcile")
    record = cast(kopf.ProgressRecord, {"started": "2026-01-01T00:00:00", "retries": 0})

    done = kopf.Patch()
    storage.store(key=handler, record=record, body=body, patch=done)
    storage.purge(key=handler, body=body, patch=done)
    assert dict(done) == {}

    retrying = kopf.Patch()
    storage.store(key=handler, record={**record, "retries": 1}, body=body, patch=retrying)
    annotations = retrying["metadata"]["annotations"]
    assert annotations["finetune.dev/kopf-managed"] == "yes"
    assert json.loads(annotations["finetune.dev/reconcile"])["retries"] == 1


def test_a_new_snapshot_for_a_worker_thread_is_taken_in_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reconciler's look, from a pass's worker thread: the indices are read in the loop
    (where kopf changes them), and the snapshot is newer than any taken before it."""
    from finetune_operator import handlers

    monkeypatch.setattr(handlers, "_state", {})
    view = JobView.from_api({"metadata": {"name": "j-train", "uid": "jid"}})
    indices = {
        "training_jobs": {("ns", "j-train"): [view]},
        "training_pods": {("ns", "j"): [("u1", pod("Running"))]},
        "gpu_nodes": None,
    }

    async def main() -> tuple[Seen, Seen, bool]:
        handlers._keep_indices(indices)
        first = handlers._seen("ns", "j")
        loop_thread = threading.get_ident()
        threads: list[int] = []
        real = handlers._seen

        def seen_where(namespace: str, name: str) -> Seen:
            threads.append(threading.get_ident())
            return real(namespace, name)

        monkeypatch.setattr(handlers, "_seen", seen_where)
        again = await asyncio.to_thread(handlers._look, "ns", "j")
        return first, again, threads == [loop_thread]

    first, again, in_loop = asyncio.run(main())
    assert in_loop
    assert again.taken > first.taken
    assert (again.job, again.pods) == (first.job, first.pods) == (view, (("u1", pod("Running")),))


def _child_event_harness(monkeypatch: pytest.MonkeyPatch, reconciler: Any) -> Any:
    """handlers.child_changed with empty module state, `reconciler` in place and no refresh
    delay; returns `change(phase)`, which updates the pods index as kopf does and runs the
    handler for a pod of job ns/j (to its end)."""
    from finetune_operator import handlers
    from finetune_operator.builders import LABEL_NAME

    monkeypatch.setattr(handlers, "_state", {"reconciler": reconciler})
    monkeypatch.setattr(handlers, "_refreshes", set())
    monkeypatch.setattr(handlers, "_refresh_soon", set())
    monkeypatch.setattr(handlers, "REFRESH_DELAY_SECONDS", 0)
    pods: dict[tuple[str, str], list[tuple[str, PodView]]] = {}
    indices = {"training_jobs": {}, "training_pods": pods, "gpu_nodes": None}
    body = kopf.Body(
        cast(
            Any, {"metadata": {"name": "j-p", "namespace": "ns", "annotations": {LABEL_NAME: "j"}}}
        )
    )
    pod_resource = kopf.Resource("", "v1", "pods")

    async def change(phase: str) -> None:
        pods[("ns", "j")] = [("u1", pod(phase))]  # kopf updates its index, then runs handlers
        event = cast(kopf.RawEvent, {"type": "MODIFIED", "object": {}})
        await handlers.child_changed(body, event, pod_resource, **indices)
        await asyncio.sleep(0.05)

    return change


async def _refreshes_done() -> None:
    from finetune_operator import handlers

    while handlers._refreshes:
        await asyncio.gather(*list(handlers._refreshes), return_exceptions=True)


def test_changes_while_a_refresh_waits_for_a_thread_are_served_by_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy operator: the refresh for a pod's first change waits for a worker thread while the
    pod changes twice more. The handler never waits for it (kopf's worker, and the pod it holds,
    go at once); those changes start no refresh of their own: the waiting one looks at the
    caches only when it runs, and sees the last of them. A change after it looked gets one."""
    from finetune_operator import handlers

    go = threading.Event()
    looked: list[Seen] = []

    class Waiting:
        def refresh(self, namespace: str, name: str, seen: Seen | None = None) -> None:
            go.wait(10)  # every worker thread is busy
            looked.append(handlers._look(namespace, name))  # as Reconciler._current does

    change = _child_event_harness(monkeypatch, Waiting())

    async def main() -> None:
        await asyncio.wait_for(change("Pending"), 5)  # returned while its refresh waits
        assert len(handlers._refreshes) == 1 and not looked
        await change("Pending")
        await change("Running")
        assert len(handlers._refreshes) == 1  # no refresh of their own
        go.set()
        await _refreshes_done()
        assert [s.pods for s in looked] == [(("u1", pod("Running")),)]
        await change("Succeeded")  # after the look: a refresh of its own
        await _refreshes_done()
        assert [s.pods[0][1].phase for s in looked] == ["Running", "Succeeded"]

    asyncio.run(main())


def test_a_failed_refresh_is_logged_and_the_next_change_gets_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that fails (the API server down) is logged, as kopf logs a failed handler, and
    leaves no mark behind: the job's next change gets a refresh of its own."""
    from finetune_operator import handlers

    calls: list[str] = []

    class Failing:
        def refresh(self, namespace: str, name: str, seen: Seen | None = None) -> None:
            calls.append(name)
            if len(calls) == 1:
                raise RuntimeError("API server down")

    change = _child_event_harness(monkeypatch, Failing())

    async def main() -> None:
        await change("Pending")
        await _refreshes_done()
        await change("Running")
        await _refreshes_done()

    with caplog.at_level(logging.ERROR, logger=handlers.log.name):
        asyncio.run(main())
    assert calls == ["j", "j"]
    assert "status refresh failed" in caplog.text and "API server down" in caplog.text
    assert not handlers._refresh_soon


def test_the_first_create_is_on_its_way_while_the_rest_are_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ServiceAccount (what the Job waits for) is sent before the Job, the costliest child to
    build, is built; the Job still comes last."""
    from finetune_operator import builders

    kube = FakeKube()
    sent = threading.Event()
    real_create, real_build = kube.create_if_missing, builders.build_job

    def create(obj: Any) -> bool:
        sent.set()
        return real_create(obj)

    seen_at_build: list[bool] = []

    def build_job(*args: Any) -> Any:
        seen_at_build.append(sent.wait(5))
        return real_build(*args)

    monkeypatch.setattr(kube, "create_if_missing", create)
    monkeypatch.setattr(builders, "build_job", build_job)
    rec, _ = reconciler(kube)
    assert rec.reconcile(body()) is None
    assert seen_at_build == [True]
    assert kube.calls[0] == ("create", "ServiceAccount") and kube.calls[-1] == ("create", "Job")


def evicted_pod(name: str = "j-train-abc") -> dict[str, Any]:
    """The running pod after the Eviction API marked it (the kubelet then stops it)."""
    pod = running_pod()
    disruption = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
    }
    meta = {**pod["metadata"], "name": name, "labels": {LABEL_UID: "u1"}}
    return {**pod, "metadata": meta, "status": {**pod["status"], "conditions": [disruption]}}


def test_a_disruption_is_told_once_even_if_a_pass_first_sees_the_replacement() -> None:
    """An evicted pod gets its DisruptionTarget condition, stops, and the Job controller replaces
    it; a busy operator may first look when the replacement already runs. The disruption is
    still news, told once; and when a pass does see it on the newest pod, once too."""
    kube = FakeKube()
    rec, events = reconciler(kube)
    kube.get_finetunejob = lambda namespace, name: body(kube.status)  # type: ignore[attr-defined]
    evicted = PodView.from_api(evicted_pod())
    replacement = {**running_pod(), "metadata": {
        "name": "j-train-new", "creationTimestamp": "2026-01-01T00:05:00Z"}}  # fmt: skip
    late = Seen.collect(ACTIVE_JOB, [("u1", evicted), ("u1", PodView.from_api(replacement))], None)
    rec.refresh("ns", "j", late)
    assert kube.status is not None and kube.status["phase"] == "Running"
    told = [m for t, r, m in events if r == "Disrupted"]
    assert len(told) == 1 and "j-train-abc" in told[0] and "EvictionByEvictionAPI" in told[0]
    rec.refresh("ns", "j", late)
    assert len([r for _t, r, _m in events if r == "Disrupted"]) == 1
    # A pass that sees the disrupted pod as the newest: the phase says it, and one Event.
    rec.forget("ns", "j")
    kube.status, events[:] = {"phase": "Running"}, []
    rec.refresh("ns", "j", Seen.collect(ACTIVE_JOB, [("u1", evicted)], None))
    assert kube.status["phase"] == "Pending" and "EvictionByEvictionAPI" in kube.status["message"]
    assert [r for _t, r, _m in events] == ["Disrupted"]
    rec.refresh("ns", "j", late)  # then its replacement: nothing more to tell of it
    assert kube.status["phase"] == "Running"
    assert [r for _t, r, _m in events].count("Disrupted") == 1
    # After a restart (nothing in memory), a status that already tells of it is not told again.
    rec.forget("ns", "j")
    kube.status, events[:] = None, []
    rec.refresh("ns", "j", Seen.collect(ACTIVE_JOB, [("u1", evicted)], None))
    rec.forget("ns", "j")
    events[:] = []
    rec.refresh("ns", "j", Seen.collect(ACTIVE_JOB, [("u1", evicted)], None))
    assert events == []


def test_a_disrupted_pod_stays_in_the_snapshots_after_its_deletion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch caches drop a deleted pod; the disruption it carried stays in the job's
    snapshots until the FineTuneJob goes."""
    from finetune_operator import handlers

    monkeypatch.setattr(handlers, "_state", {})
    monkeypatch.setattr(handlers, "_disrupted", {})
    monkeypatch.setattr(handlers, "_refreshes", set())
    pods: dict[tuple[str, str], list[tuple[str, PodView]]] = {}
    indices = {"training_jobs": {}, "training_pods": pods, "gpu_nodes": None}
    monkeypatch.setitem(handlers._state, "indices", indices)
    monkeypatch.setattr(handlers, "REFRESH_DELAY_SECONDS", 0)
    refreshed: list[str] = []

    class Recording:
        def refresh(self, namespace: str, name: str, seen: Seen | None = None) -> None:
            refreshed.append(name)

        def forget(self, namespace: str, name: str) -> None:
            refreshed.append(f"forget {name}")

    monkeypatch.setitem(handlers._state, "reconciler", Recording())
    monkeypatch.setitem(handlers._state, "specs", tuning.SpecMemory())
    evicted = evicted_pod()
    evicted["metadata"] |= {"namespace": "ns", "annotations": {LABEL_NAME: "j"}}
    pod_resource = kopf.Resource("", "v1", "pods")

    async def deleted() -> None:
        event = cast(kopf.RawEvent, {"type": "DELETED", "object": evicted})
        pods.pop(("ns", "j"), None)  # kopf drops it from its index, then runs handlers
        await handlers.child_changed(kopf.Body(evicted), event, pod_resource, **indices)
        await _refreshes_done()

    asyncio.run(deleted())
    ((owner_uid, view),) = handlers._seen("ns", "j").pods
    assert owner_uid == "u1" and view.name == "j-train-abc"
    assert view.disruption == "EvictionByEvictionAPI: Eviction API: evicting"
    # present in the caches again (never, but a relist): listed once
    pods[("ns", "j")] = [("u1", view)]
    assert len(handlers._seen("ns", "j").pods) == 1
    ftj = {"metadata": {"name": "j", "namespace": "ns", "uid": "u1"}, "status": {}}
    monkeypatch.setattr(handlers, "_ensure_ticker", lambda: None)
    asyncio.run(
        handlers.track_awaiting_pod(
            cast(kopf.RawEvent, {"type": "DELETED"}), kopf.Body(ftj), **indices
        )
    )
    pods.clear()
    assert handlers._seen("ns", "j").pods == ()
    assert refreshed == ["j", "forget j"]  # the deletion was a change too
