"""Where a FineTuneJob may run: its GPU requirement, as node affinity the kube-scheduler enforces,
and, when nothing fits, a diagnosis that names the requirement and what the GPU nodes offer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kubernetes.client import (
    V1Affinity,
    V1LabelSelector,
    V1NodeAffinity,
    V1NodeSelector,
    V1NodeSelectorRequirement,
    V1NodeSelectorTerm,
    V1PodAffinity,
    V1PodAffinityTerm,
)

from finetune_api.gpu import ComputeCapability, scheme_key
from finetune_api.resource import FineTuneJobSpec
from finetune_operator.memory import MemoryEstimate, estimate_memory, model_shape
from finetune_operator.settings import GpuLabels, Settings


@dataclass(frozen=True)
class GpuRequirement:
    """What a node's GPUs must offer to run one FineTuneJob."""

    scheme: str  # a QuantizationScheme value, or "none" for unquantized LoRA
    min_capability: ComputeCapability
    memory: MemoryEstimate | None  # None: model size unknown, no memory constraint
    enforce_memory: bool

    @property
    def min_memory_mib(self) -> int | None:
        if self.memory is None or not self.enforce_memory:
            return None
        return self.memory.required_mib

    def describe(self) -> str:
        text = f"needs {self.min_capability.describe_minimum()}"
        if self.min_memory_mib is not None:
            text += f" and ≥ {self.min_memory_mib} MiB per GPU"
        return text


def gpu_requirement(spec: FineTuneJobSpec, settings: Settings) -> GpuRequirement:
    """The requirement for a validated spec, from the admin's scheme table."""
    key = scheme_key(spec.training.resolved_quantization_scheme)
    shape = model_shape(spec)
    memory = estimate_memory(spec, shape) if shape is not None else None
    return GpuRequirement(
        scheme=key,
        min_capability=settings.min_capability[key],
        memory=memory,
        enforce_memory=settings.memory_affinity,
    )


def _expr(key: str, operator: str, values: Iterable[int]) -> V1NodeSelectorRequirement:
    return V1NodeSelectorRequirement(key=key, operator=operator, values=[str(v) for v in values])


def capability_terms(
    minimum: ComputeCapability, labels: GpuLabels
) -> list[list[V1NodeSelectorRequirement]]:
    """Node selector terms (ORed) admitting exactly the capabilities >= minimum.

    Labels hold integers, so (major, minor) >= (M, m) becomes: major > M, or major == M and
    minor > m - 1. A minimum with minor 0 needs only the first form (major > M - 1).
    """
    if minimum.minor == 0:
        return [[_expr(labels.compute_major, "Gt", [minimum.major - 1])]]
    return [
        [_expr(labels.compute_major, "Gt", [minimum.major])],
        [
            _expr(labels.compute_major, "In", [minimum.major]),
            _expr(labels.compute_minor, "Gt", [minimum.minor - 1]),
        ],
    ]


def node_affinity(requirement: GpuRequirement, labels: GpuLabels) -> V1Affinity:
    """Required node affinity: a compatible compute capability and, when known, enough memory."""
    terms = capability_terms(requirement.min_capability, labels)
    if requirement.min_memory_mib is not None:
        memory = _expr(labels.memory_mib, "Gt", [requirement.min_memory_mib - 1])
        terms = [[*term, memory] for term in terms]
    return V1Affinity(
        node_affinity=V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=V1NodeSelector(
                node_selector_terms=[V1NodeSelectorTerm(match_expressions=t) for t in terms]
            )
        )
    )


def same_product_affinity(selector: Mapping[str, str], labels: GpuLabels) -> V1PodAffinity:
    """Required pod affinity of a multi-node job's pods to each other over the GPU product label:
    the scheduler places the first pod by the node affinity, then every other pod only on a node
    whose product label has the same value (a pod matching its own term may go first)."""
    return V1PodAffinity(
        required_during_scheduling_ignored_during_execution=[
            V1PodAffinityTerm(
                label_selector=V1LabelSelector(match_labels=dict(selector)),
                topology_key=labels.product,
            )
        ]
    )


@dataclass(frozen=True)
class GpuNode:
    """What a node's GPU Feature Discovery labels say about it."""

    name: str
    capability: ComputeCapability | None
    memory_mib: int | None
    product: str

    @classmethod
    def from_labels(cls, name: str, node_labels: Mapping[str, str], labels: GpuLabels) -> GpuNode:
        capability = None
        major, minor = node_labels.get(labels.compute_major), node_labels.get(labels.compute_minor)
        if major is not None and minor is not None and major.isdigit() and minor.isdigit():
            capability = ComputeCapability(int(major), int(minor))
        memory = node_labels.get(labels.memory_mib, "")
        return cls(
            name=name,
            capability=capability,
            memory_mib=int(memory) if memory.isdigit() else None,
            product=node_labels.get(labels.product, "unknown GPU"),
        )

    def capable(self, requirement: GpuRequirement) -> bool:
        return self.capability is not None and self.capability >= requirement.min_capability

    def roomy(self, requirement: GpuRequirement) -> bool:
        needed = requirement.min_memory_mib
        return needed is None or (self.memory_mib is not None and self.memory_mib >= needed)


@dataclass(frozen=True)
class Diagnosis:
    reason: str  # NoCompatibleGPU, InsufficientGPUMemory or Unschedulable
    message: str


NO_GPU_NODES = "no nodes with GPU Feature Discovery labels"


def summarize_nodes(nodes: Iterable[GpuNode], none: str = NO_GPU_NODES) -> str:
    """E.g. "2 × 8.0 NVIDIA-A100-SXM4-80GB, 1 × 7.5 Tesla-T4", newest first; `none` when empty.
    (A GpuNode is a node in device-plugin mode, one device of a ResourceSlice with DRA.)"""
    counts = Counter(
        (n.capability, n.product, n.memory_mib) for n in nodes if n.capability is not None
    )
    if not counts:
        return none
    ordered = sorted(counts.items(), key=lambda item: (item[0][0], item[0][1]), reverse=True)
    parts = []
    for (capability, product, memory), count in ordered:
        text = f"{count} × {capability} {product}"
        if memory is not None:
            text += f" ({memory} MiB)"
        parts.append(text)
    return ", ".join(parts)


def diagnose_unschedulable(
    requirement: GpuRequirement,
    nodes: Iterable[GpuNode],
    scheduler_message: str,
    noun: str = "nodes",
    none: str = NO_GPU_NODES,
) -> Diagnosis:
    """Why a training pod cannot be placed, in terms of the job's GPU requirement. `nodes` are
    the GPU nodes (device plugin) or the GPUs the ResourceSlices offer (DRA: noun "devices")."""
    gpu_nodes = [n for n in nodes if n.capability is not None]
    capable = [n for n in gpu_nodes if n.capable(requirement)]
    offer = summarize_nodes(gpu_nodes, none)
    if not capable:
        return Diagnosis("NoCompatibleGPU", f"{requirement.describe()}; {noun}: {offer}")
    if not any(n.roomy(requirement) for n in capable):
        return Diagnosis(
            "InsufficientGPUMemory",
            f"{requirement.describe()} (estimated); compatible {noun}: "
            f"{summarize_nodes(capable, none)}",
        )
    return Diagnosis(
        "Unschedulable",
        f"cannot be scheduled yet: {scheduler_message} (GPU requirement: {requirement.describe()})",
    )
