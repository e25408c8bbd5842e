"""The KWOK fleet and the scale benchmark's bookkeeping, without a cluster."""

from __future__ import annotations

from collections import Counter

from bench_scale import MINIMUM, Tracker, ftj
from finetune_api.gpu import DEFAULT_MIN_CAPABILITY
from kwoksim import KWOK_ANNOTATION, mixed_nodes, node_body


def test_mixed_fleet_cycles_generations_and_sizes() -> None:
    fleet = mixed_nodes(30)
    per_generation: Counter[str] = Counter()
    for node in fleet:
        per_generation[str(node.gpu.capability)] += node.gpus
    assert len(per_generation) == 6 and set(per_generation.values()) == {16}
    assert {n.gpus for n in fleet} == {1, 2, 4, 8}
    assert len({n.name for n in fleet}) == 30


def test_node_is_kwoks_with_gfd_labels_gpus_and_the_gpu_taint() -> None:
    node = node_body(mixed_nodes(24)[23])  # the 24th: a B200 node with 8 GPUs
    assert node.metadata.annotations == {KWOK_ANNOTATION: "fake"}
    labels = node.metadata.labels
    assert labels["nvidia.com/gpu.compute.major"] == "10"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    assert [(t.key, t.effect) for t in node.spec.taints] == [("nvidia.com/gpu", "NoSchedule")]


def test_benchmark_minimums_agree_with_the_operator_defaults() -> None:
    for scheme, minimum in MINIMUM.items():
        assert DEFAULT_MIN_CAPABILITY[scheme] == minimum
    assert ftj("a", "none")["spec"]["training"]["quantize_model"] is False


def test_tracker_settles_on_running_pod_or_waiting_condition() -> None:
    tracker = Tracker(by_job={"a-train": "a", "b-train": "b"})
    pod = {"metadata": {"labels": {"job-name": "a-train"}}, "spec": {"nodeName": "n"}}
    tracker.on_pod({**pod, "status": {"phase": "Pending"}})
    assert tracker.settled("a") is None
    tracker.on_pod({**pod, "status": {"phase": "Running"}})
    assert tracker.settled("a") is not None
    cond = {"type": "Scheduled", "status": "False", "reason": "Unschedulable"}
    tracker.on_ftj(
        {"metadata": {"name": "b"}, "status": {"phase": "Pending", "conditions": [cond]}}
    )
    assert tracker.settled("b") is not None and tracker.reasons == {"b": "Unschedulable"}
    other = {**cond, "reason": "PodPending"}
    tracker.on_ftj({"metadata": {"name": "c"}, "status": {"conditions": [other]}})
    assert tracker.settled("c") is None
