"""Multi-node end to end: `resources.nodes: 2` -> the operator's Indexed Job and headless Service ->
kube-scheduler places both pods on one GPU product -> two trainer pods (processes run by the
stand-in kubelet, hack/podrunner.py, each with its own hostname and the Service's names in its
hosts file) meet in torch's c10d rendezvous at pod 0 and train the tiny model together on CPU
(gloo). One pod is killed mid-run (every process of it at once, as a dying node or an OOM kill
ends a container): the surviving pod's agent restarts its worker, the Job's replacement pod joins
it, and the run resumes from the last checkpoint and finishes at the planned step count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import plan
from gpusim import GPU_TYPES, create_gpu_node, delete_node
from integration.harness import (
    Cluster,
    Namespace,
    wait_for,
)
from integration.test_training_e2e import seed_volumes, trainer_cluster
from podrunner import LocalRuntime
from tinymodel import tiny_finetunejob

pytestmark = [pytest.mark.integration, pytest.mark.training]

# Nodes of their own, which no other test's pod selects or tolerates.
POOL = "finetune.dev/test-pool"
NODES = ("mn-a10-a", "mn-a10-b")
INDEX = "batch.kubernetes.io/job-completion-index"
PRODUCT = "nvidia.com/gpu.product"
# Batch 1 on each of 2 workers: 2 records a step. A checkpoint every save_steps(STEPS) steps; pod 1
# is killed once the first one is complete, leaving the rest of the run to resume.
STEPS = 300
RECORDS = 2 * STEPS
FIRST_CHECKPOINT = plan.save_steps(STEPS)  # 15
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


@dataclass
class MultiNode:
    ns: Namespace
    runtime: LocalRuntime
    runtime_dir: Path

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')[-2500:]}"
            for path in sorted(self.runtime_dir.glob("*.log"))
        )


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[tuple[str, ...]]:
    for name in NODES:
        create_gpu_node(cluster.core, name, GPU_TYPES["a10"], gpus=1)
        taints = [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
            {"key": POOL, "value": "multinode", "effect": "NoSchedule"},
        ]
        cluster.core.patch_node(
            name, {"metadata": {"labels": {POOL: "multinode"}}, "spec": {"taints": taints}}
        )
    try:
        yield NODES
    finally:
        for name in NODES:
            delete_node(cluster.core, name)


@pytest.fixture
def mn(
    cluster: Cluster, gpu_nodes: dict[str, str], pool: tuple[str, ...], tmp_path: Path
) -> Iterator[MultiNode]:
    with trainer_cluster(cluster, tmp_path) as (ns, _, runtime, runtime_dir):
        yield MultiNode(ns, runtime, runtime_dir)


def two_node_job(name: str) -> dict[str, Any]:
    job = tiny_finetunejob(name, TRAINING, "corpus/train.jsonl", ("out", f"adapters/{name}"))
    spec = job["spec"]
    spec["dataset"]["maxSequenceLength"] = 16
    spec["resources"] = {"nodes": 2, "cpu": "1", "memory": "4Gi"}
    spec["placement"] = {
        "nodeSelector": {POOL: "multinode"},
        "tolerations": [{"key": POOL, "operator": "Exists", "effect": "NoSchedule"}],
    }
    return job


def index(pod: Any) -> str | None:
    return (pod.metadata.annotations or {}).get(INDEX)


def losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("killed_index", ["1", "0"])
def test_two_pods_train_together_and_resume_after_one_is_killed(
    mn: MultiNode, killed_index: str
) -> None:
    """Pod 1 killed: pod 0's agent restarts its worker and waits for pod 1's replacement. Pod 0
    killed (it hosts the rendezvous store): pod 1 fails too and both are replaced."""
    ns, core = mn.ns, mn.ns.cluster.core
    seed_volumes(ns)
    assert ns.apply(two_node_job("duo")).returncode == 0

    # The headless Service gives the pods their stable names.
    service = wait_for(
        lambda: next(iter(core.list_namespaced_service(ns.name).items), None),
        what="the workers Service",
    )
    assert service.metadata.name == "duo-workers" and service.spec.cluster_ip == "None"

    # Both pods of the Indexed Job run, on nodes of one GPU product.
    def running() -> list[Any] | None:
        pods = [p for p in ns.pods("duo") if p.status.phase == "Running"]
        return pods if len(pods) == 2 else None

    pods = wait_for(running, timeout=120, what="2 running pods", describe=lambda: ns.pods("duo"))
    assert sorted(index(p) for p in pods) == ["0", "1"]
    assert {p.spec.subdomain for p in pods} == {"duo-workers"}
    assert sorted(p.spec.hostname for p in pods) == ["duo-train-0", "duo-train-1"]
    nodes = [core.read_node(p.spec.node_name) for p in pods]
    assert {p.spec.node_name for p in pods} == set(NODES)
    assert len({n.metadata.labels[PRODUCT] for n in nodes}) == 1
    other = next(p for p in pods if index(p) != killed_index)

    # Kill one pod (every process of it) once the first checkpoint is complete.
    output = ns.volumes["out"] / "adapters" / "duo"
    first = output / "checkpoints" / f"checkpoint-{FIRST_CHECKPOINT}"

    def checkpointed() -> bool:
        assert ns.ftj("duo").get("status", {}).get("phase") != "Failed", mn.logs()
        return (first / "trainer_state.json").exists()

    wait_for(
        checkpointed,
        timeout=480,
        interval=0.2,
        what=f"{first.name}",
        describe=mn.logs,
    )
    victim = next(p for p in pods if index(p) == killed_index)
    assert mn.runtime.kill(victim), "the pod had already ended"

    wait_for(
        lambda: ns.ftj("duo").get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=600,
        interval=1,
        what="the run to end",
        describe=mn.logs,
    )
    status = ns.ftj("duo")["status"]
    assert status["phase"] == "Succeeded", f"{status}\n{mn.logs()}"

    # The killed pod failed (137) and was replaced.
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
    assert sorted(status["placement"]["nodes"]) == sorted(NODES)  # one pod on each
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == STEPS

    # The loss fell over the whole run (the last checkpoint holds every logged loss).
    logged = losses(output / "checkpoints" / f"checkpoint-{STEPS}")
    assert len(logged) >= 20
    assert sum(logged[-5:]) / 5 < sum(logged[:5]) / 5
