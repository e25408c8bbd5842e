"""GPU requirement -> node affinity, evaluated the way the kube-scheduler evaluates it."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobSpec
from finetune_operator.placement import (
    GpuNode,
    GpuRequirement,
    capability_terms,
    diagnose_unschedulable,
    gpu_requirement,
    node_affinity,
    summarize_nodes,
)
from finetune_operator.settings import GpuLabels, Settings, parse_settings

LABELS = GpuLabels()


def matches(requirement: Any, labels: dict[str, str]) -> bool:
    """Kubernetes NodeSelectorRequirement semantics (In, NotIn, Exists, DoesNotExist, Gt, Lt)."""
    value = labels.get(requirement.key)
    op, values = requirement.operator, requirement.values or []
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if value is None or not value.lstrip("-").isdigit():
        return False
    return int(value) > int(values[0]) if op == "Gt" else int(value) < int(values[0])


def admitted(affinity: Any, labels: dict[str, str]) -> bool:
    terms = affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    return any(all(matches(r, labels) for r in t.match_expressions) for t in terms)


def node_labels(capability: str, memory: int = 81920) -> dict[str, str]:
    major, minor = capability.split(".")
    return {
        LABELS.compute_major: major,
        LABELS.compute_minor: minor,
        LABELS.memory_mib: str(memory),
    }


def requirement(minimum: str, memory_mib: int | None = None) -> GpuRequirement:
    req = GpuRequirement("bnb-4bit", ComputeCapability.parse(minimum), None, True)
    if memory_mib is None:
        return req

    class Fixed:
        required_mib = memory_mib

    return GpuRequirement("bnb-4bit", req.min_capability, Fixed(), True)  # type: ignore[arg-type]


ALL = ["6.1", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0"]


@pytest.mark.parametrize(
    ("minimum", "admits"),
    [
        ("8.9", {"8.9", "9.0", "10.0", "10.3", "12.0"}),
        ("8.0", {"8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0"}),
        ("9.0", {"9.0", "10.0", "10.3", "12.0"}),
        ("10.0", {"10.0", "10.3", "12.0"}),
        ("8.6", {"8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0"}),
        ("7.5", {"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0"}),
    ],
)
def test_capability_affinity_compares_major_minor(minimum: str, admits: set[str]) -> None:
    affinity = node_affinity(requirement(minimum), LABELS)
    assert {c for c in ALL if admitted(affinity, node_labels(c))} == admits


def test_minor_zero_needs_a_single_term() -> None:
    (term,) = capability_terms(ComputeCapability(9, 0), LABELS)
    assert [(r.key, r.operator, r.values) for r in term] == [(LABELS.compute_major, "Gt", ["8"])]


def test_nodes_without_labels_are_refused() -> None:
    affinity = node_affinity(requirement("8.9"), LABELS)
    assert not admitted(affinity, {})
    assert not admitted(affinity, {LABELS.compute_major: "8"})  # minor unknown: cannot prove >= 8.9
    assert admitted(affinity, {LABELS.compute_major: "9"})  # any 9.x qualifies


def test_memory_term_is_anded_into_every_term() -> None:
    affinity = node_affinity(requirement("8.9", memory_mib=40000), LABELS)
    assert admitted(affinity, node_labels("8.9", memory=46068))
    assert admitted(affinity, node_labels("9.0", memory=40000))
    assert not admitted(affinity, node_labels("9.0", memory=39999))
    assert not admitted(affinity, node_labels("10.0", memory=24000))


def test_custom_label_keys_are_used() -> None:
    labels = GpuLabels(compute_major="example.com/cc-major", compute_minor="example.com/cc-minor")
    affinity = node_affinity(requirement("8.9"), labels)
    assert admitted(affinity, {"example.com/cc-major": "9", "example.com/cc-minor": "0"})
    assert not admitted(affinity, node_labels("9.0"))


def spec(**training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "dataset": {"claimName": "d", "path": "t.jsonl"},
            "output": {"claimName": "o", "path": "a"},
            "training": training,
        }
    )


@pytest.mark.parametrize(
    ("training", "key", "minimum"),
    [
        ({"quantize_model": True, "quantization_scheme": "bnb-4bit"}, "bnb-4bit", "8.0"),
        ({"quantize_model": True, "quantization_bits": 8}, "bnb-8bit", "8.0"),
        ({"quantize_model": True, "quantization_scheme": "fp8"}, "fp8", "9.0"),
        ({"quantize_model": True, "quantization_scheme": "nvfp4"}, "nvfp4", "10.0"),
        ({"quantize_model": True, "quantization_scheme": "mxfp4"}, "mxfp4", "9.0"),
        ({"quantize_model": False, "quantization_scheme": "nvfp4"}, "none", "8.0"),
    ],
)
def test_requirement_follows_the_resolved_scheme(
    training: dict[str, Any], key: str, minimum: str
) -> None:
    req = gpu_requirement(spec(**training), Settings())
    assert (req.scheme, str(req.min_capability)) == (key, minimum)


def test_admin_table_overrides() -> None:
    settings = parse_settings(["--min-capability", "mxfp4=10.0, none=7.5"])
    assert (
        str(
            gpu_requirement(
                spec(quantize_model=True, quantization_scheme="mxfp4"), settings
            ).min_capability
        )
        == "10.0"
    )
    assert str(gpu_requirement(spec(), settings).min_capability) == "7.5"


def test_memory_requirement_only_for_known_sizes() -> None:
    assert gpu_requirement(spec(pretrained_model="acme/unknown"), Settings()).min_memory_mib is None
    known = gpu_requirement(spec(pretrained_model="meta-llama/Llama-3.2-1B"), Settings())
    assert known.min_memory_mib is not None and known.min_memory_mib > 1000
    off = gpu_requirement(
        spec(pretrained_model="meta-llama/Llama-3.2-1B"), Settings(memory_affinity=False)
    )
    assert off.min_memory_mib is None and off.memory is not None


NODES = [
    GpuNode("a1", ComputeCapability(8, 0), 81920, "NVIDIA-A100-SXM4-80GB"),
    GpuNode("a2", ComputeCapability(8, 0), 81920, "NVIDIA-A100-SXM4-80GB"),
    GpuNode("t1", ComputeCapability(7, 5), 15360, "Tesla-T4"),
    GpuNode("cpu", None, None, "unknown GPU"),
]


def test_no_compatible_gpu_message_names_requirement_and_offer() -> None:
    diagnosis = diagnose_unschedulable(requirement("9.0"), NODES, "0/4 nodes are available")
    assert diagnosis.reason == "NoCompatibleGPU"
    assert diagnosis.message == (
        "needs compute capability ≥ 9.0 (Hopper or newer); nodes: "
        "2 × 8.0 NVIDIA-A100-SXM4-80GB (81920 MiB), 1 × 7.5 Tesla-T4 (15360 MiB)"
    )


def test_insufficient_memory_and_busy_diagnoses() -> None:
    short = diagnose_unschedulable(requirement("8.0", memory_mib=90000), NODES, "x")
    assert short.reason == "InsufficientGPUMemory"
    assert "≥ 90000 MiB per GPU" in short.message and "2 × 8.0 NVIDIA-A100" in short.message
    busy = diagnose_unschedulable(
        requirement("8.0", memory_mib=40000),
        NODES,
        "0/4 nodes are available: 2 Insufficient nvidia.com/gpu.",
    )
    assert busy.reason == "Unschedulable"
    assert "2 Insufficient nvidia.com/gpu" in busy.message


def test_gpu_node_from_labels_tolerates_junk() -> None:
    node = GpuNode.from_labels("n", {LABELS.compute_major: "x", LABELS.memory_mib: "lots"}, LABELS)
    assert node.capability is None and node.memory_mib is None
    assert summarize_nodes([node]) == "no nodes with GPU Feature Discovery labels"
