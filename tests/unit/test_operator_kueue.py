"""Queued jobs without a cluster: the Job Kueue admits, the Workload view, the status it yields,
and the local Kueue's webhook registration (hack/kueue.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from kubernetes.client import ApiClient

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobSpec, FineTuneJobStatus
from finetune_operator import builders
from finetune_operator.builders import JobIdentity
from finetune_operator.kueue import WorkloadView, waiting
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import GpuRequirement, gpu_requirement
from finetune_operator.settings import Settings
from finetune_operator.status import Observation, derive
from kueue import crds, webhook_configurations

QUEUED = JobIdentity(name="j", namespace="ml", uid="u1", queue="team-a", priority="urgent")
SPEC = FineTuneJobSpec.model_validate(
    {
        "dataset": {"claimName": "data", "path": "t.jsonl"},
        "output": {"claimName": "out", "path": "j"},
        "training": {"quantize_model": True, "quantization_scheme": "fp8"},
    }
)
REQ = GpuRequirement("fp8", ComputeCapability(9, 0), None, True)
JOB = JobView("j-train", builders.spec_hash(SPEC), True, 0, 0, 0, None, None, None, None, "ju")


def workload(*conditions: tuple[str, str, str, str], admitted_to: str | None = None) -> Any:
    status: dict[str, Any] = {
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions
        ]
    }
    if admitted_to:
        status["admission"] = {
            "clusterQueue": "team-a",
            "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": admitted_to}}],
        }
    status["schedulingStats"] = {
        "evictions": [{"reason": "Preempted", "underlyingCause": "", "count": 2}]
    }
    return {
        "metadata": {"name": "job-j-train-abcde"},
        "spec": {"queueName": "team-a"},
        "status": status,
    }


def test_queued_job_is_created_suspended_with_kueues_labels() -> None:
    settings = Settings()
    job = ApiClient().sanitize_for_serialization(
        builders.build_job(QUEUED, SPEC, gpu_requirement(SPEC, settings), settings)
    )
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "urgent"
    plain = dataclasses.replace(QUEUED, queue=None, priority=None)
    unqueued = ApiClient().sanitize_for_serialization(
        builders.build_job(plain, SPEC, gpu_requirement(SPEC, settings), settings)
    )
    assert unqueued["spec"]["suspend"] is False
    assert not any(k.startswith("kueue.x-k8s.io/") for k in unqueued["metadata"]["labels"])


def test_workload_view_and_waiting_reason() -> None:
    pending = WorkloadView.from_api(
        workload(("QuotaReserved", "False", "Pending", "couldn't assign flavors:  quota"))
    )
    assert not pending.admitted and pending.active and pending.evictions == 2
    wait = waiting("team-a", pending)
    assert wait is not None and wait.reason == "Pending"
    assert wait.message == "queued in LocalQueue team-a: couldn't assign flavors: quota"
    evicted = WorkloadView.from_api(
        workload(
            ("QuotaReserved", "False", "Pending", ""),
            ("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
        )
    )
    wait = waiting("team-a", evicted)
    assert wait is not None and wait.reason == "Preempted" and "resumes from it" in wait.message
    none = waiting("team-a", None)
    assert none is not None and none.reason == "WaitingForWorkload"
    admitted = WorkloadView.from_api(
        workload(("QuotaReserved", "True", "QuotaReserved", ""), ("Admitted", "True", "Admitted", ""),
                 admitted_to="hopper-h100")
    )  # fmt: skip
    assert waiting("team-a", admitted) is None
    assert admitted.cluster_queue == "team-a" and admitted.flavors == ("hopper-h100",)


def obs(**extra: Any) -> Observation:
    fields: dict[str, Any] = {
        "generation": 1, "now": "2026-01-01T00:00:10Z", "requirement": REQ, "job": JOB,
        "queue": "team-a",
    }  # fmt: skip
    fields.update(extra)
    return Observation(**fields)


def test_status_queued_then_admitted_then_running() -> None:
    pending = WorkloadView.from_api(
        workload(("QuotaReserved", "False", "Pending", "insufficient quota"))
    )
    status, events = derive(FineTuneJobStatus(), obs(workload=pending))
    assert status.phase == "Queued"
    assert status.message == "queued in LocalQueue team-a: insufficient quota"
    admitted_cond = status.condition("Admitted")
    assert admitted_cond is not None and (admitted_cond.status, admitted_cond.reason) == (
        "False",
        "Pending",
    )
    assert status.queue is not None and status.queue.local_queue == "team-a"
    assert [e.reason for e in events] == ["Pending"]

    admitted = WorkloadView.from_api(
        workload(("Admitted", "True", "Admitted", ""), admitted_to="hopper-h100")
    )
    status, events = derive(status, obs(workload=admitted))
    assert status.phase == "Admitted" and [e.reason for e in events] == ["Admitted"]
    assert status.message == (
        "admitted by ClusterQueue team-a (flavor hopper-h100); waiting for the training pod"
    )
    cond = status.condition("Admitted")
    assert cond is not None and cond.status == "True"
    assert cond.message == "admitted by ClusterQueue team-a (flavor hopper-h100)"

    running = PodView(
        "p", "2026-01-01T00:00:00Z", "gpu-h100", "Running", None, "2026-01-01T00:00:05Z",
        None, None, None,
    )  # fmt: skip
    status, _ = derive(status, obs(workload=admitted, pods=(running,)))
    assert status.phase == "Running"
    assert status.queue is not None and status.queue.flavors == ["hopper-h100"]


def test_spec_suspend_wins_over_the_queue() -> None:
    admitted = WorkloadView.from_api(workload(("Admitted", "True", "Admitted", "")))
    status, _ = derive(FineTuneJobStatus(), obs(workload=admitted, suspend=True))
    assert status.phase == "Suspended"


MANIFESTS = """
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: mutating-webhook-configuration}
webhooks:
- name: mjob.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}}
  rules: [{apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}]
- name: mpod.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: validating-webhook-configuration}
webhooks:
- name: vworkload.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /validate-w}}
  rules: [{apiGroups: [kueue.x-k8s.io], apiVersions: [v1beta2], operations: [CREATE], resources: [workloads]}]
"""


def test_local_kueue_registers_only_the_webhooks_it_serves_at_its_url(tmp_path: Any) -> None:
    mutating, validating = webhook_configurations(MANIFESTS, "https://127.0.0.1:9", b"PEM")
    assert [h["name"] for h in mutating["webhooks"]] == ["mjob.kb.io"]
    assert mutating["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:9/mutate-batch-v1-job",
        "caBundle": "UEVN",
    }
    assert [h["name"] for h in validating["webhooks"]] == ["vworkload.kb.io"]
    (tmp_path / "w.yaml").write_text(
        "spec: {names: {plural: workloads}}\nmetadata: {name: workloads.kueue.x-k8s.io}\n"
    )
    (tmp_path / "r.yaml").write_text(
        "spec: {names: {plural: resourceflavors}}\nmetadata: {name: resourceflavors.kueue.x-k8s.io}\n"
    )
    converted = {
        c["metadata"]["name"]: c["spec"].get("conversion")
        for c in crds(tmp_path, "https://h", b"PEM")
    }
    assert converted["resourceflavors.kueue.x-k8s.io"] is None
    conversion = converted["workloads.kueue.x-k8s.io"]
    assert conversion["webhook"]["clientConfig"]["url"] == "https://h/convert"
