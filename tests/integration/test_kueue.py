"""Kueue admits queued FineTuneJobs: the real Kueue controller manager (built from its Go module,
hack/kueue-binaries.sh) with its own webhooks, against the local control plane.

Two ResourceFlavors keyed on GPU Feature Discovery labels (an Ampere A100, a Hopper H100) and two
ClusterQueues with one GPU of each flavor; team-b preempts lower priorities. The session's
simulated nodes carry one GPU of each type; the stand-in kubelet runs pods until told to finish.

FINETUNE_SKIP_KUEUE=1 skips this file (and says so); nothing else does: where Kueue cannot be
built, the fixture fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpusim import GPU_TYPES, FakeKubelet, gfd_labels
from integration.harness import (
    Cluster,
    Namespace,
    Operator,
    ftj_manifest,
    make_namespace,
    remove_namespace,
    scheme_training,
    wait_for,
)
from kueue import LocalKueue

pytestmark = pytest.mark.integration

if os.environ.get("FINETUNE_SKIP_KUEUE") == "1":
    pytest.skip("FINETUNE_SKIP_KUEUE=1: Kueue tests skipped on request", allow_module_level=True)

KUEUE = ("kueue.x-k8s.io", "v1beta2")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GFD_KEYS = (
    "nvidia.com/gpu.product",
    "nvidia.com/gpu.compute.major",
    "nvidia.com/gpu.compute.minor",
)
FLAVORS = {"ampere-a100": GPU_TYPES["a100"], "hopper-h100": GPU_TYPES["h100"]}


def flavor(name: str) -> dict[str, Any]:
    labels = gfd_labels(FLAVORS[name], 1)
    return {
        "apiVersion": "/".join(KUEUE),
        "kind": "ResourceFlavor",
        "metadata": {"name": name},
        "spec": {"nodeLabels": {k: labels[k] for k in GFD_KEYS}},
    }


def cluster_queue(name: str, preempt: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "namespaceSelector": {},
        "resourceGroups": [
            {
                "coveredResources": ["nvidia.com/gpu"],
                "flavors": [
                    {"name": f, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 1}]}
                    for f in FLAVORS
                ],
            }
        ],
    }
    if preempt:
        spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
    return {
        "apiVersion": "/".join(KUEUE),
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def kueue(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKueue]:
    local = LocalKueue(tmp_path_factory.mktemp("kueue"), cluster.kubeconfig)
    try:
        local.start()
        objects = [flavor(f) for f in FLAVORS]
        objects += [cluster_queue("team-a", preempt=False), cluster_queue("team-b", preempt=True)]
        for value, name in ((100, "ftj-low"), (1000, "ftj-high")):
            objects.append(
                {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                 "metadata": {"name": name}, "value": value}
            )  # fmt: skip
        text = yaml.safe_dump_all(objects)
        # Kueue's webhooks answer from now on: its own admission checks these objects.
        cluster.kubectl("apply", "-f", "-", input=text)
        yield local
        cluster.kubectl("delete", "-f", "-", "--wait=false", input=text, check=False)
    finally:
        local.stop()


@pytest.fixture
def queued(
    cluster: Cluster, operator: Operator, kueue: LocalKueue, tmp_path: Path
) -> Iterator[Namespace]:
    """A namespace the shared operator watches, with LocalQueues team-a and team-b."""
    ns = make_namespace(cluster, tmp_path)
    for team in ("team-a", "team-b"):
        local_queue = {
            "apiVersion": "/".join(KUEUE), "kind": "LocalQueue",
            "metadata": {"name": team}, "spec": {"clusterQueue": team},
        }  # fmt: skip
        assert ns.apply(local_queue).returncode == 0
    try:
        yield ns
    finally:
        remove_namespace(ns)
        # The next test starts from empty queues: Kueue gives the quota back once the deleted
        # jobs' Workloads are gone, a little after their namespace.
        wait_for(lambda: not quota_in_use(cluster), timeout=120, what="quota given back",
                 describe=lambda: quota_in_use(cluster))  # fmt: skip


def quota_in_use(cluster: Cluster) -> dict[str, Any]:
    """ClusterQueues with workloads holding quota, and how many."""
    queues = cluster.custom.list_cluster_custom_object(*KUEUE, "clusterqueues")["items"]
    return {
        q["metadata"]["name"]: q.get("status", {}).get("reservingWorkloads")
        for q in queues
        if q.get("status", {}).get("reservingWorkloads")
    }


def queued_job(name: str, queue: str, scheme: str, **spec: Any) -> dict[str, Any]:
    manifest = ftj_manifest(name, scheme_training(scheme), **spec)
    manifest["metadata"]["labels"] = {QUEUE_LABEL: queue}
    return manifest


def status(ns: Namespace, name: str) -> dict[str, Any]:
    return dict(ns.ftj(name).get("status", {}))


def phase(ns: Namespace, name: str) -> str | None:
    return status(ns, name).get("phase")


def workload(ns: Namespace, name: str) -> dict[str, Any]:
    """Kueue's Workload for the FineTuneJob's Job."""
    (job,) = [j for j in ns.jobs() if j.metadata.name == f"{name}-train"]
    found = ns.cluster.custom.list_namespaced_custom_object(
        *KUEUE, ns.name, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={job.metadata.uid}"
    )["items"]
    assert len(found) == 1, found
    return dict(found[0])


def assigned_flavors(ns: Namespace, name: str) -> set[str]:
    admission = workload(ns, name).get("status", {}).get("admission") or {}
    return {f for ps in admission.get("podSetAssignments", []) for f in ps["flavors"].values()}


def running_pod(ns: Namespace, name: str) -> Any:
    pods = [
        p
        for p in ns.pods(name)
        if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
    ]
    return pods[0] if pods else None


def kubectl_phases(ns: Namespace) -> dict[str, str]:
    out = ns.cluster.kubectl("get", "ftj", "-n", ns.name, "--no-headers").stdout.splitlines()
    return {line.split()[0]: line.split()[1] for line in out if line.strip()}


def test_quota_admits_two_and_queues_the_third_until_one_finishes(
    queued: Namespace, kubelet: FakeKubelet, kueue: LocalKueue
) -> None:
    ns = queued
    for name in ("one", "two"):
        assert ns.apply(queued_job(name, "team-a", "bnb-4bit")).returncode == 0
        wait_for(lambda n=name: phase(ns, n) == "Running", timeout=90, what=f"{name} Running",
                 describe=lambda n=name: (status(ns, n), kueue.log()[-1500:]))  # fmt: skip
    assert ns.apply(queued_job("three", "team-a", "bnb-4bit")).returncode == 0

    def three_queued() -> dict[str, Any] | None:
        s = status(ns, "three")
        return s if s.get("phase") == "Queued" and "quota" in s.get("message", "") else None

    queued_status = wait_for(three_queued, timeout=60, what="three Queued with Kueue's reason",
                             describe=lambda: status(ns, "three"))  # fmt: skip
    # Kueue's own reason and message, in the FineTuneJob's words.
    admitted = next(c for c in queued_status["conditions"] if c["type"] == "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "Pending"
    assert queued_status["message"].startswith("queued in LocalQueue team-a: ")
    assert queued_status["queue"]["localQueue"] == "team-a"
    assert kubectl_phases(ns) == {"one": "Running", "two": "Running", "three": "Queued"}
    # The two admitted jobs took one GPU of each flavor; the queued one has no pod, and its Job
    # stays suspended (Kueue's hold; the operator never unsuspends it).
    assert assigned_flavors(ns, "one") | assigned_flavors(ns, "two") == set(FLAVORS)
    assert ns.pods("three") == []
    (job,) = [j for j in ns.jobs() if j.metadata.name == "three-train"]
    assert job.spec.suspend is True and job.metadata.labels[QUEUE_LABEL] == "team-a"

    first = running_pod(ns, "one")
    kubelet.finish(first, 0)
    wait_for(lambda: phase(ns, "one") == "Succeeded", timeout=60, what="one Succeeded")
    wait_for(lambda: phase(ns, "three") == "Running", timeout=90, what="three admitted and Running",
             describe=lambda: status(ns, "three"))  # fmt: skip
    done = status(ns, "three")
    admitted = next(c for c in done["conditions"] if c["type"] == "Admitted")
    assert admitted["status"] == "True" and "ClusterQueue team-a" in admitted["message"]
    assert done["queue"]["clusterQueue"] == "team-a"

    def reasons_up_to_running() -> list[str] | None:
        # kopf posts Events from a queue, after the status patch: wait for the Running one.
        events = ns.cluster.core.list_namespaced_event(
            ns.name, field_selector="involvedObject.kind=FineTuneJob,involvedObject.name=three"
        ).items
        ordered = sorted(events, key=lambda e: int(e.metadata.resource_version))
        reasons = [e.reason for e in ordered]
        return reasons if "Running" in reasons else None

    reasons = wait_for(reasons_up_to_running, timeout=30, what="three's Running event")
    # Queued (with Kueue's reason), then Running: an Event for each phase; Admitted in between
    # when a refresh saw it (it lasts only until the pod runs; the condition above says it).
    queued_at = min(reasons.index(r) for r in ("WaitingForWorkload", "Pending") if r in reasons)
    admitted_at = reasons.index("Admitted") if "Admitted" in reasons else queued_at
    assert queued_at <= admitted_at < reasons.index("Running"), reasons


def test_scheme_only_one_flavor_can_run_is_admitted_only_to_that_flavor(
    queued: Namespace, kueue: LocalKueue
) -> None:
    """fp8 needs compute capability ≥ 9.0: Kueue checks the operator's node affinity against the
    flavors' GFD labels and skips the A100 flavor, although it comes first and has quota."""
    ns = queued
    assert ns.apply(queued_job("eight", "team-a", "fp8")).returncode == 0
    wait_for(lambda: phase(ns, "eight") == "Running", timeout=90, what="eight Running",
             describe=lambda: status(ns, "eight"))  # fmt: skip
    assert assigned_flavors(ns, "eight") == {"hopper-h100"}
    pod = running_pod(ns, "eight")
    assert pod.spec.node_name == "gpu-h100"
    # Kueue injected the flavor's labels as a node selector, next to the operator's affinity.
    assert pod.spec.node_selector["nvidia.com/gpu.compute.major"] == "9"
    assert pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert status(ns, "eight")["queue"]["flavors"] == ["hopper-h100"]

    # With the H100 taken, a second fp8 job waits: the free A100 quota is never used for it.
    assert ns.apply(queued_job("eight-more", "team-a", "fp8")).returncode == 0

    def flavor_refused() -> str | None:
        s = status(ns, "eight-more")
        message = str(s.get("message", ""))
        return message if s.get("phase") == "Queued" and "affinity" in message else None

    message = wait_for(flavor_refused, timeout=60, what="eight-more Queued, A100 refused",
                       describe=lambda: status(ns, "eight-more"))  # fmt: skip
    # Kueue's own words: "flavor ampere-a100 doesn't match node affinity".
    assert "ampere-a100" in message, message
    wl = workload(ns, "eight-more")
    assert not wl.get("status", {}).get("admission"), "admitted to a flavor that cannot run fp8"


def test_higher_priority_preempts_and_the_lower_job_resumes(
    queued: Namespace, kubelet: FakeKubelet, kueue: LocalKueue
) -> None:
    ns = queued
    placement = {"priorityClassName": "ftj-low"}
    # backoffLimit 0: had the preemption counted as a failed attempt, the Job would fail at once.
    low = queued_job("low", "team-b", "fp8", placement=placement, backoffLimit=0)
    assert ns.apply(low).returncode == 0
    wait_for(lambda: phase(ns, "low") == "Running", timeout=90, what="low Running")
    first = running_pod(ns, "low")

    high = queued_job("high", "team-b", "fp8", placement={"priorityClassName": "ftj-high"})
    assert ns.apply(high).returncode == 0

    def preempted() -> dict[str, Any] | None:
        s = status(ns, "low")
        return s if s.get("phase") == "Queued" and "Preempted" in s.get("message", "") else None

    evicted = wait_for(preempted, timeout=90, what="low preempted and Queued",
                       describe=lambda: (status(ns, "low"), status(ns, "high")))  # fmt: skip
    assert "resumes from it" in evicted["message"]
    wait_for(lambda: phase(ns, "high") == "Running", timeout=90, what="high Running",
             describe=lambda: status(ns, "high"))  # fmt: skip
    # The preempted pod was stopped (SIGTERM: the stand-in kubelet ends it with 143).
    wait_for(lambda: all(p.metadata.uid != first.metadata.uid for p in ns.pods("low")),
             timeout=60, what="the preempted pod gone")  # fmt: skip
    (low_job,) = [j for j in ns.jobs() if j.metadata.name == "low-train"]
    assert low_job.spec.suspend is True

    kubelet.finish(running_pod(ns, "high"), 0)
    wait_for(lambda: phase(ns, "low") == "Running", timeout=120, what="low re-admitted, Running",
             describe=lambda: status(ns, "low"))  # fmt: skip
    second = running_pod(ns, "low")
    assert second.metadata.uid != first.metadata.uid
    (low_job,) = [j for j in ns.jobs() if j.metadata.name == "low-train"]
    assert not low_job.status.failed, "the preemption used up a retry"
    assert status(ns, "low")["queue"]["evictions"] >= 1
    kubelet.finish(second, 0)
    wait_for(lambda: phase(ns, "low") == "Succeeded", timeout=60, what="low Succeeded")


def test_spec_suspend_of_a_queued_job_deactivates_its_workload(
    queued: Namespace, kueue: LocalKueue
) -> None:
    """spec.suspend of a queued job goes through Kueue (the Workload's spec.active): the operator
    never flips the suspend of a Job Kueue holds."""
    ns = queued
    assert ns.apply(queued_job("pause", "team-a", "bnb-4bit")).returncode == 0
    wait_for(lambda: phase(ns, "pause") == "Running", timeout=90, what="pause Running")
    assert ns.apply(queued_job("pause", "team-a", "bnb-4bit", suspend=True)).returncode == 0
    wait_for(lambda: phase(ns, "pause") == "Suspended", timeout=60, what="Suspended")
    wait_for(lambda: workload(ns, "pause")["spec"].get("active") is False, what="inactive")
    wait_for(lambda: not [p for p in ns.pods("pause") if p.metadata.deletion_timestamp is None],
             timeout=60, what="no pod left")  # fmt: skip
    assert ns.apply(queued_job("pause", "team-a", "bnb-4bit", suspend=False)).returncode == 0
    wait_for(lambda: phase(ns, "pause") == "Running", timeout=90, what="Running again",
             describe=lambda: status(ns, "pause"))  # fmt: skip
    assert workload(ns, "pause")["spec"].get("active") is not False


def test_a_multi_node_job_is_one_workload_admitted_whole_or_not_at_all(
    queued: Namespace, kueue: LocalKueue
) -> None:
    """resources.nodes 2: one Job of parallelism 2, so one Workload whose pod set counts 2 pods.
    Each flavor has quota for 1 GPU: Kueue admits no part of it (no pod starts)."""
    ns = queued
    manifest = queued_job("duo", "team-a", "bnb-4bit", resources={"nodes": 2, "gpus": 1})
    assert ns.apply(manifest).returncode == 0

    def waiting() -> dict[str, Any] | None:
        s = status(ns, "duo")
        return s if s.get("phase") == "Queued" and "quota" in s.get("message", "") else None

    queued_status = wait_for(waiting, timeout=60, what="duo Queued for quota",
                             describe=lambda: status(ns, "duo"))  # fmt: skip
    wl = workload(ns, "duo")
    assert [(ps["name"], ps["count"]) for ps in wl["spec"]["podSets"]] == [("main", 2)]
    assert wl.get("status", {}).get("admission") is None
    assert queued_status["message"].startswith("queued in LocalQueue team-a: ")
    (job,) = [j for j in ns.jobs() if j.metadata.name == "duo-train"]
    assert job.spec.suspend is True and job.spec.parallelism == 2
    assert ns.pods("duo") == []
