"""The real kube-scheduler places training pods only on GPUs that can run the job's scheme."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobSpec
from finetune_operator.memory import estimate_memory, model_shape
from gpusim import GPU_TYPES, create_gpu_node, delete_node
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

pytestmark = pytest.mark.integration

CAPABILITY = {key: ComputeCapability(gpu.major, gpu.minor) for key, gpu in GPU_TYPES.items()}
NODE_CAPABILITY = {f"gpu-{key}": cap for key, cap in CAPABILITY.items()}


def bound_node(ns: Namespace, name: str) -> str | None:
    pods = ns.pods(name)
    return pods[0].spec.node_name if pods and pods[0].spec.node_name else None


@pytest.mark.parametrize(
    ("scheme", "minimum"),
    [
        ("bnb-4bit", "8.0"),
        ("bnb-8bit", "8.0"),
        ("fp8", "9.0"),
        ("nvfp4", "10.0"),
        ("mxfp4", "9.0"),
        (None, "8.0"),
    ],
)
def test_scheme_lands_only_on_compatible_gpus(
    namespace: Namespace, scheme: str | None, minimum: str
) -> None:
    """One more job than there are compatible single-GPU nodes: each compatible node gets one,
    the extra job waits although incompatible nodes have free GPUs."""
    required = ComputeCapability.parse(minimum)
    compatible = {n for n, cap in NODE_CAPABILITY.items() if cap >= required}
    names = [f"job-{i}" for i in range(len(compatible) + 1)]
    for name in names:
        assert namespace.apply(ftj_manifest(name, scheme_training(scheme))).returncode == 0

    def placed() -> dict[str, str | None] | None:
        nodes = {n: bound_node(namespace, n) for n in names}
        return nodes if sum(v is not None for v in nodes.values()) == len(compatible) else None

    nodes = wait_for(placed, timeout=90, what=f"{len(compatible)} pods bound")
    assert {n for n in nodes.values() if n} == compatible
    waiting = next(n for n, node in nodes.items() if node is None)

    def waiting_condition() -> dict[str, Any] | None:
        cond = namespace.condition(waiting, "Scheduled")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for(waiting_condition, what="Scheduled=False on the extra job")
    assert cond["reason"] == "Unschedulable"  # compatible GPUs exist, they are just busy
    assert f"compute capability ≥ {minimum}" in cond["message"]

    for name, node in nodes.items():
        if node is None:
            continue
        status = wait_for(
            lambda n=name: (
                namespace.ftj(n).get("status", {}).get("phase") == "Running"
                and namespace.ftj(n)["status"]
            ),
            what=f"{name} Running",
        )
        placement = status["placement"]
        assert placement["node"] == node
        assert placement["requiredComputeCapability"] == minimum
        assert placement["scheme"] == (scheme or "none")
        assert placement["gpuProduct"] == GPU_TYPES[node.removeprefix("gpu-")].product
        scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
        assert scheduled["status"] == "True" and node in scheduled["message"]


@pytest.fixture
def without_blackwell(cluster: Cluster, gpu_nodes: dict[str, str]) -> Iterator[None]:
    delete_node(cluster.core, gpu_nodes["b200"])
    try:
        yield
    finally:
        if not cluster.core.list_node(field_selector=f"metadata.name={gpu_nodes['b200']}").items:
            create_gpu_node(cluster.core, gpu_nodes["b200"], GPU_TYPES["b200"], gpus=1)


def test_no_compatible_gpu_then_a_blackwell_node_joins(
    cluster: Cluster, namespace: Namespace, without_blackwell: None
) -> None:
    assert namespace.apply(ftj_manifest("fp4", scheme_training("nvfp4"))).returncode == 0

    def no_gpu() -> dict[str, Any] | None:
        cond = namespace.condition("fp4", "Scheduled")
        return cond if cond and cond["reason"] == "NoCompatibleGPU" else None

    cond = wait_for(no_gpu, timeout=60, what="NoCompatibleGPU")
    assert cond["status"] == "False"
    message = cond["message"]
    assert message.startswith("needs compute capability ≥ 10.0 (Blackwell or newer)")
    assert "; nodes: 1 × 9.0 NVIDIA-H100" in message  # newest first
    assert "1 × 9.0 NVIDIA-H100-80GB-HBM3 (81559 MiB)" in message
    assert "1 × 7.5 Tesla-T4 (15360 MiB)" in message
    assert namespace.ftj("fp4")["status"]["phase"] == "Pending"

    def warned() -> bool:
        events = cluster.core.list_namespaced_event(
            namespace.name, field_selector="involvedObject.name=fp4"
        ).items
        return any(e.reason == "NoCompatibleGPU" and e.type == "Warning" for e in events)

    wait_for(warned, timeout=30, what="a NoCompatibleGPU event")

    create_gpu_node(cluster.core, "gpu-b200", GPU_TYPES["b200"], gpus=1)
    wait_for(
        lambda: bound_node(namespace, "fp4") == "gpu-b200", timeout=90, what="bound to the new B200"
    )
    wait_for(
        lambda: (namespace.condition("fp4", "Scheduled") or {}).get("status") == "True",
        what="Scheduled=True",
    )


def test_insufficient_gpu_memory(namespace: Namespace) -> None:
    manifest = ftj_manifest(
        "huge",
        {
            "quantize_model": False,
            "peft_implementation": "lora",
            "pretrained_model": "acme/giant-400b",
        },
        model={"parametersBillions": 400},
    )
    assert namespace.apply(manifest).returncode == 0

    def short() -> dict[str, Any] | None:
        cond = namespace.condition("huge", "Scheduled")
        return cond if cond and cond["reason"] == "InsufficientGPUMemory" else None

    cond = wait_for(short, timeout=60, what="InsufficientGPUMemory")
    estimate = namespace.ftj("huge")["status"]["placement"]["estimatedGpuMemoryMiB"]
    assert estimate > 183359  # more than the largest simulated GPU
    assert f"≥ {estimate} MiB per GPU" in cond["message"]
    assert "NVIDIA-B200" in cond["message"]


def test_memory_estimate_picks_a_roomy_gpu(namespace: Namespace) -> None:
    """Llama 3.1 70B in 4 bits needs more than an L40S's 46 GB but fits 80 GB cards."""
    training = {
        "quantize_model": True,
        "quantization_scheme": "bnb-4bit",
        "pretrained_model": "meta-llama/Llama-3.1-70B",
        "batch_size": 1,
    }
    manifest = ftj_manifest(
        "big",
        training,
        dataset={"claimName": "data", "path": "train.jsonl", "maxSequenceLength": 1024},
    )
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    shape = model_shape(spec)
    assert shape is not None
    estimate = estimate_memory(spec, shape)
    assert (
        estimate is not None
        and GPU_TYPES["l40s"].memory_mib < estimate.required_mib <= GPU_TYPES["a100"].memory_mib
    )
    assert namespace.apply(manifest).returncode == 0
    node = wait_for(lambda: bound_node(namespace, "big"), timeout=60, what="bound")
    assert GPU_TYPES[node.removeprefix("gpu-")].memory_mib >= estimate.required_mib
    placement = wait_for(
        lambda: namespace.ftj("big").get("status", {}).get("placement"), what="placement status"
    )
    assert placement["estimatedGpuMemoryMiB"] == estimate.required_mib


@pytest.fixture
def capability_8_9(
    cluster: Cluster, gpu_nodes: dict[str, str], tmp_path: Path
) -> Iterator[Namespace]:
    """A second operator whose admin table says bnb-8bit needs 8.9, watching its own namespace."""
    op = Operator(
        cluster, tmp_path / "op89.log", "--namespace", "s89-*", "--min-capability", "bnb-8bit=8.9"
    ).start()
    ns = make_namespace(cluster, tmp_path, prefix="s89")
    try:
        yield ns
    finally:
        remove_namespace(ns)
        op.stop()


def test_admin_capability_table_is_compared_as_major_minor(capability_8_9: Namespace) -> None:
    """A rule of 8.9 admits 8.9, 9.0 and 10.0 and refuses 8.0 and 8.6."""
    ns = capability_8_9
    names = [f"job-{i}" for i in range(4)]
    for name in names:
        assert ns.apply(ftj_manifest(name, scheme_training("bnb-8bit"))).returncode == 0

    def placed() -> set[str] | None:
        nodes = {bound_node(ns, n) for n in names} - {None}
        return {str(n) for n in nodes} if len(nodes) == 3 else None

    assert wait_for(placed, timeout=90, what="three pods bound") == {
        "gpu-l40s",
        "gpu-h100",
        "gpu-b200",
    }
    waiting = next(n for n in names if bound_node(ns, n) is None)
    cond = wait_for(
        lambda: (
            (ns.condition(waiting, "Scheduled") or {}).get("status") == "False"
            and ns.condition(waiting, "Scheduled")
        ),
        what="extra job waits",
    )
    assert "compute capability ≥ 8.9 (Ada Lovelace or newer)" in cond["message"]
