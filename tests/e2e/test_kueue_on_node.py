"""Kueue preempts a training pod on the real node: the kubelet stops the trainer's container with
SIGTERM, the trainer checkpoints (its own words in `kubectl logs -f`), and once Kueue admits the
job again the new pod resumes from that checkpoint, with no retry used.

The real Kueue controller manager (hack/kueue.py) against the node's control plane; ClusterQueue
`solo` holds one GPU of the Hopper flavor (the node's labels) and preempts lower priorities.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from realnode import RealNode

from integration.harness import Cluster, wait_for
from integration.test_kueue import (
    KUEUE,
    QUEUE_LABEL,
    cluster_queue,
    flavor,
    phase,
    running_pod,
    status,
)
from kueue import LocalKueue
from nodetier import OnNode, seed_volumes, tiny_job, trainer_namespace
from tinymodel import TINY_QLORA

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1800)]
FLAVOR = "hopper-h100"


@pytest.fixture
def solo(
    node_cluster: Cluster, real_node: RealNode, trainer_image: str, volume_root: Path,
    tmp_path: Path,
) -> Iterator[OnNode]:  # fmt: skip
    """Kueue with ClusterQueue `solo` (one H100, preempting), priorities ftj-low and ftj-high, and
    a namespace with LocalQueue `solo`."""
    queue = cluster_queue("solo", preempt=True)
    queue["spec"]["resourceGroups"][0]["flavors"] = [
        {"name": FLAVOR, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 1}]}
    ]
    objects = [flavor(FLAVOR), queue]
    for value, name in ((100, "ftj-low"), (1000, "ftj-high")):
        objects.append(
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
             "metadata": {"name": name}, "value": value}
        )  # fmt: skip
    text = yaml.safe_dump_all(objects)
    kueue = LocalKueue(tmp_path / "kueue", node_cluster.kubeconfig)
    try:
        kueue.start()
        node_cluster.kubectl("apply", "-f", "-", input=text)
        with trainer_namespace(node_cluster, trainer_image, volume_root, tmp_path) as on_node:
            local_queue = {
                "apiVersion": "/".join(KUEUE), "kind": "LocalQueue",
                "metadata": {"name": "solo"}, "spec": {"clusterQueue": "solo"},
            }  # fmt: skip
            assert on_node.ns.apply(local_queue).returncode == 0
            yield on_node
        node_cluster.kubectl("delete", "-f", "-", "--wait=false", input=text, check=False)
    finally:
        kueue.stop()


def tiny_queued_job(name: str, priority: str, records: int) -> dict[str, Any]:
    job = tiny_job(name, {**TINY_QLORA, "num_input_records_to_sample": records})
    del job["spec"]["resources"]  # GPUs only: the ClusterQueue covers no CPU or memory
    job["metadata"]["labels"] = {QUEUE_LABEL: "solo"}
    job["spec"]["placement"] = {"priorityClassName": priority}
    job["spec"]["backoffLimit"] = 0  # a preemption that counted as a failure would end it
    return job


def test_preempted_trainer_checkpoints_and_resumes_when_readmitted(
    solo: OnNode, tmp_path: Path
) -> None:
    ns = solo.ns
    seed_volumes(ns)
    # Long enough that the preemption (Kueue, the operator, the kubelet: seconds) lands while the
    # trainer still trains: at 60 steps a fast machine finished first (steps of ~0.1 s).
    records = 2400
    steps = records // (2 * 2)  # batch_size 2, gradient_accumulation_steps 2
    assert ns.apply(tiny_queued_job("low", "ftj-low", records)).returncode == 0

    def progressed() -> bool:
        progress = status(ns, "low").get("progress") or {}
        return int(progress.get("step") or 0) >= 8

    wait_for(progressed, timeout=600, interval=1, what="low training past step 8",
             describe=solo.logs)  # fmt: skip
    first = running_pod(ns, "low")
    # What the preempted container says to the end, as `kubectl logs -f` shows it.
    first_log = tmp_path / "low-first.log"
    with first_log.open("w") as sink:
        follower = subprocess.Popen(
            ["kubectl", "logs", "-f", "-n", ns.name, first.metadata.name],
            stdout=sink, stderr=subprocess.STDOUT, env=ns.cluster.env,
        )  # fmt: skip
    try:
        assert ns.apply(tiny_queued_job("high", "ftj-high", 16)).returncode == 0

        def preempted() -> dict[str, Any] | None:
            s = status(ns, "low")
            return s if s.get("phase") == "Queued" and "Preempted" in s.get("message", "") else None

        wait_for(preempted, timeout=120, what="low preempted",
                 describe=lambda: (status(ns, "low"), status(ns, "high")))  # fmt: skip
        wait_for(lambda: phase(ns, "high") in ("Admitted", "Running", "Succeeded"), timeout=120,
                 what="high admitted", describe=lambda: status(ns, "high"))  # fmt: skip
        # The preempted trainer stopped on SIGTERM with a checkpoint before its pod was gone.
        wait_for(lambda: all(p.metadata.uid != first.metadata.uid for p in ns.pods("low")),
                 timeout=300, what="the preempted pod gone")  # fmt: skip
        follower.wait(timeout=60)
    finally:
        follower.kill()
    said = first_log.read_text(errors="replace")
    assert "a retry resumes from checkpoint-" in said, said[-3000:]
    # The high-priority job leaves: Kueue admits the preempted one again.
    ns.cluster.kubectl("delete", "ftj", "high", "-n", ns.name, "--wait=true", "--timeout=120s")
    wait_for(lambda: phase(ns, "low") in ("Succeeded", "Failed"), timeout=600, interval=1,
             what="low to finish", describe=solo.logs)  # fmt: skip
    final = status(ns, "low")
    assert final["phase"] == "Succeeded", f"{final}\n{solo.logs()}"
    assert final["result"]["steps"] == steps
    assert final["result"]["resumedFromStep"] >= 8
    assert final["queue"]["evictions"] >= 1
    summary = json.loads(
        (ns.volumes["out"] / "adapters" / "low" / "training_summary.json").read_text()
    )
    assert summary["steps"] == steps and summary["resumed_from"].startswith("checkpoint-")
    (job,) = [j for j in ns.jobs() if j.metadata.name == "low-train"]
    assert not job.status.failed, "the preemption used up a retry"
