"""Several training pods on the real node: `resources.nodes: 2` -> the operator's Indexed Job and
headless Service -> the kubelet runs two trainer containers (one `nvidia.com/gpu` each from the
device plugin's two), which find each other through cluster DNS (CoreDNS: `duo-train-0.duo-workers`
on the pod's search path), meet in torch's c10d rendezvous at pod 0 and train the tiny model
together on CPU (gloo) across the pod network. One pod's container is killed mid-run (SIGKILL to
every process in it, as the OOM killer or a dying node ends it): the run resumes from the last
checkpoint and finishes at the planned step count.

One machine holds one real node, so both pods share it; across nodes only the route between the
pod IPs differs (the rendezvous, DNS names and the Job's bookkeeping are the same).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realnode import RealNode

from finetune_trainer import plan
from integration.harness import Cluster, wait_for
from nodetier import NODE, OnNode, seed_volumes, tiny_job, trainer_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1800)]

INDEX = "batch.kubernetes.io/job-completion-index"
# Batch 1 on each of 2 workers: 2 records a step. A checkpoint every save_steps(STEPS) steps; a pod
# is killed once the first one is complete, leaving the rest of the run to resume.
STEPS = 200
RECORDS = 2 * STEPS
FIRST_CHECKPOINT = plan.save_steps(STEPS)
TRAINING = {
    "pretrained_model": "tiny-llama",
    "quantize_model": False,
    "peft_implementation": "lora",
    "num_input_records_to_sample": RECORDS,
    "batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 0.005,
    "lr_scheduler": "constant",
    "lora_r": 2,
    "lora_target_modules": ["q_proj"],
    "validation_ratio": 0.0,
}


@pytest.fixture
def mn(
    node_cluster: Cluster, real_node: RealNode, trainer_image: str, volume_root: Path,
    tmp_path: Path,
) -> Iterator[tuple[OnNode, RealNode]]:  # fmt: skip
    with trainer_namespace(node_cluster, trainer_image, volume_root, tmp_path) as on_node:
        yield on_node, real_node


def two_pod_job(name: str) -> dict[str, Any]:
    # 900m each: both fit beside the node's own pods on its two cores (limits = requests).
    job = tiny_job(name, TRAINING, cpu="900m")
    job["spec"]["dataset"]["maxSequenceLength"] = 16
    job["spec"]["resources"]["nodes"] = 2
    return job


def index(pod: Any) -> str | None:
    return (pod.metadata.annotations or {}).get(INDEX)


def losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("killed_index", ["1", "0"])
def test_two_pods_train_together_and_resume_after_one_is_killed(
    mn: tuple[OnNode, RealNode], killed_index: str
) -> None:
    """Pod 1 killed: pod 0's agent restarts its worker and waits for pod 1's replacement. Pod 0
    killed (it hosts the rendezvous store): pod 1 fails too and both are replaced."""
    on_node, node = mn
    ns, core = on_node.ns, on_node.ns.cluster.core
    seed_volumes(ns)
    assert ns.apply(two_pod_job("duo")).returncode == 0

    # The headless Service gives the pods their stable names.
    service = wait_for(
        lambda: next(iter(core.list_namespaced_service(ns.name).items), None),
        what="the workers Service",
    )
    assert service.metadata.name == "duo-workers" and service.spec.cluster_ip == "None"

    # Both pods of the Indexed Job run in containerd.
    def running() -> list[Any] | None:
        pods = [p for p in ns.pods("duo") if p.status.phase == "Running"]
        return pods if len(pods) == 2 else None

    pods = wait_for(running, timeout=300, what="2 running pods", describe=on_node.logs)
    assert sorted(index(p) for p in pods) == ["0", "1"]
    assert {p.spec.subdomain for p in pods} == {"duo-workers"}
    assert sorted(p.spec.hostname for p in pods) == ["duo-train-0", "duo-train-1"]
    assert {p.spec.node_name for p in pods} == {NODE}
    assert len({p.status.pod_ip for p in pods}) == 2
    other = next(p for p in pods if index(p) != killed_index)

    # Kill one pod's container (every process in it) once the first checkpoint is complete.
    output = ns.volumes["out"] / "adapters" / "duo"
    first = output / "checkpoints" / f"checkpoint-{FIRST_CHECKPOINT}"

    def checkpointed() -> bool:
        assert ns.ftj("duo").get("status", {}).get("phase") != "Failed", on_node.logs()
        return (first / "trainer_state.json").exists()

    wait_for(checkpointed, timeout=600, interval=0.2, what=first.name, describe=on_node.logs)
    victim = next(p for p in pods if index(p) == killed_index)
    node.kill_container(victim.status.container_statuses[0].container_id)

    wait_for(
        lambda: ns.ftj("duo").get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=900,
        interval=1,
        what="the run to end",
        describe=on_node.logs,
    )
    status = ns.ftj("duo")["status"]
    assert status["phase"] == "Succeeded", f"{status}\n{on_node.logs()}"

    # The killed pod failed (137, the kubelet's report of a SIGKILL) and was replaced.
    pods = ns.pods("duo")
    by_uid = {p.metadata.uid: p for p in pods}
    assert by_uid[victim.metadata.uid].status.phase == "Failed"
    killed = by_uid[victim.metadata.uid].status.container_statuses[0].state.terminated
    assert killed.exit_code == 137
    job = ns.jobs()[0]
    assert job.status.succeeded == 2
    replaced = [
        p for p in pods if index(p) == killed_index and p.metadata.uid != victim.metadata.uid
    ]
    assert [p.status.phase for p in replaced] == ["Succeeded"]
    if killed_index == "1":  # pod 0 survived: its agent restarted its worker
        assert by_uid[other.metadata.uid].status.phase == "Succeeded"
        assert job.status.failed == 1
    else:  # the store went with pod 0: pod 1 failed as well and was replaced too
        assert by_uid[other.metadata.uid].status.phase == "Failed"
        assert job.status.failed == 2

    # One adapter, from rank 0, trained over the planned steps of 2 workers, resumed mid-run.
    summary = json.loads((output / "training_summary.json").read_text())
    assert (output / "adapter_model.safetensors").stat().st_size > 0
    adapters = list(ns.volumes["out"].rglob("adapter_model.safetensors"))
    assert [p.parent for p in adapters if "checkpoints" not in p.parts] == [output]
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    resumed = summary["resumed_from"]
    assert resumed is not None and int(resumed.removeprefix("checkpoint-")) >= FIRST_CHECKPOINT
    result = status["result"]
    assert result["steps"] == STEPS and result["recordsSeen"] == RECORDS
    assert set(status["placement"]["nodes"]) == {NODE}
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == STEPS

    # The loss fell over the whole run (the last checkpoint holds every logged loss).
    logged = losses(output / "checkpoints" / f"checkpoint-{STEPS}")
    assert len(logged) >= 20
    assert sum(logged[-5:]) / 5 < sum(logged[:5]) / 5
