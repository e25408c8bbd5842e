"""Multi-node jobs (spec.resources.nodes > 1), built and observed without a cluster: the Indexed
Job, the headless Service, the same-product pod affinity, the trainer's rendezvous env, and the
status of N pods."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from kubernetes.client import ApiClient
from pydantic import ValidationError
from unit.test_operator_status import JOB as JOB_VIEW
from unit.test_operator_status import obs, pod

from finetune_api.resource import FineTuneJobSpec, FineTuneJobStatus
from finetune_api.trainer_config import TrainerOutcome
from finetune_operator import builders
from finetune_operator.builders import JobIdentity
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import gpu_requirement
from finetune_operator.settings import Settings
from finetune_operator.status import derive
from podsecurity import restricted_violations

JOB = JobIdentity(name="llama-sft", namespace="ml", uid="0000-1111", generation=3)
SERIALIZE = ApiClient().sanitize_for_serialization


def spec(nodes: int = 2, **extra: Any) -> FineTuneJobSpec:
    body: dict[str, Any] = {
        "dataset": {"claimName": "data", "path": "sets/train.jsonl"},
        "output": {"claimName": "adapters", "path": "llama-sft"},
        "training": {"quantize_model": True, "quantization_scheme": "bnb-4bit"},
        "resources": {"nodes": nodes, "gpus": 2},
    }
    body.update(extra)
    return FineTuneJobSpec.model_validate(body)


def job_dict(s: FineTuneJobSpec, settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    result: dict[str, Any] = SERIALIZE(
        builders.build_job(JOB, s, gpu_requirement(s, settings), settings)
    )
    return result


def env(job: dict[str, Any]) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_nodes_defaults_to_one_and_is_bounded() -> None:
    assert spec(nodes=1).resources.nodes == 1
    assert (
        FineTuneJobSpec.model_validate(spec().model_dump(exclude={"resources"})).resources.nodes
        == 1
    )
    for bad in (0, 65):
        with pytest.raises(ValidationError, match="nodes"):
            spec(nodes=bad)
    assert spec().placement.same_gpu_product is True


def test_one_node_is_the_plain_job_as_before() -> None:
    job = job_dict(spec(nodes=1))
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert "completionMode" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert "podAffinity" not in job["spec"]["template"]["spec"]["affinity"]
    assert not {k for k in env(job) if "RDZV" in k or k == "FINETUNE_NNODES"}


def test_several_nodes_are_an_indexed_job_under_the_workers_service() -> None:
    s = spec(nodes=3, backoffLimit=2)
    job = job_dict(s)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["spec"]["backoffLimit"] == 6  # one failure may fail all 3 pods
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["subdomain"] == "llama-sft-workers"
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"  # per pod
    assert restricted_violations(pod_spec) == []
    assert {
        "FINETUNE_NNODES": "3",
        "FINETUNE_RDZV_ENDPOINT": "llama-sft-train-0.llama-sft-workers:29400",
        "FINETUNE_RDZV_ID": "0000-1111",
        "FINETUNE_SUBDOMAIN": "llama-sft-workers",
    }.items() <= env(job).items()


def test_the_workers_service_is_headless_and_selects_the_jobs_pods() -> None:
    service = SERIALIZE(builders.build_workers_service(JOB))
    assert service["metadata"]["name"] == "llama-sft-workers"
    assert service["metadata"]["ownerReferences"][0]["uid"] == "0000-1111"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {builders.LABEL_UID: "0000-1111"}
    template_labels = job_dict(spec())["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()


def test_same_gpu_product_by_pod_affinity_on_the_product_label() -> None:
    affinity = job_dict(spec())["spec"]["template"]["spec"]["affinity"]
    assert affinity["nodeAffinity"]  # the scheme's requirement stays
    (term,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == {
        "labelSelector": {"matchLabels": {builders.LABEL_UID: "0000-1111"}},
        "topologyKey": "nvidia.com/gpu.product",
    }
    mixed = job_dict(spec(placement={"sameGPUProduct": False}))
    assert "podAffinity" not in mixed["spec"]["template"]["spec"]["affinity"]


def test_dra_gives_each_pod_a_claim_from_the_template() -> None:
    settings = dataclasses.replace(Settings(), gpu_allocation="dra")
    pod_spec = job_dict(spec(), settings)["spec"]["template"]["spec"]
    assert "affinity" not in pod_spec
    assert pod_spec["resourceClaims"] == [
        {"name": "gpus", "resourceClaimTemplateName": "llama-sft-gpus"}
    ]


# --- Status of N pods ---------------------------------------------------------------------------

TWO = dataclasses.replace(JOB_VIEW, completions=2, active=2)


def outcome(message: str, steps: int) -> str:
    result = {"adapter": "pvc://o/a", "steps": steps}
    body = {"outcome": "Succeeded", "reason": "Completed", "message": message, "result": result}
    return json.dumps(TrainerOutcome.model_validate(body).model_dump(mode="json", by_alias=True))


def test_the_index_comes_from_the_job_controllers_annotation() -> None:
    body = {
        "metadata": {
            "name": "j-train-1-abcde",
            "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
        },
        "status": {"phase": "Running"},
    }
    assert PodView.from_api(body).index == 1
    body["metadata"]["annotations"] = {}
    assert PodView.from_api(body).index is None
    job = {"metadata": {"name": "j"}, "spec": {"completions": 2}}
    assert JobView.from_api(job).completions == 2


def test_one_pod_done_is_not_the_run_done() -> None:
    done = pod("Succeeded", "n1", index=1, termination_message=outcome("rank 1", 10))
    running = pod("Running", "n2", name="p0", index=0, created="2026-01-01T00:00:01Z")
    status, _ = derive(FineTuneJobStatus(), obs(job=TWO, pods=(done, running)))
    assert status.phase == "Running"


def test_the_result_is_rank_0s_pod() -> None:
    zero = pod("Succeeded", "n1", name="p0", index=0, termination_message=outcome("rank 0", 10))
    one = pod(
        "Succeeded", "n2", index=1, created="2026-01-01T00:00:05Z",
        termination_message=outcome("rank 1", 9),
    )  # fmt: skip
    complete = dataclasses.replace(TWO, active=0, succeeded=2, complete_time="t")
    status, _ = derive(FineTuneJobStatus(), obs(job=complete, pods=(zero, one)))
    assert status.phase == "Succeeded"
    assert status.result is not None and status.result.steps == 10


def test_placement_lists_each_indexs_node_once_all_are_bound() -> None:
    zero = pod("Running", "n1", name="p0", index=0)
    one = pod("Pending", None, index=1)
    status, _ = derive(FineTuneJobStatus(), obs(job=TWO, pods=(zero, one)))
    assert status.placement is not None and status.placement.nodes is None
    bound = dataclasses.replace(one, node="n2", phase="Running")
    status, _ = derive(status, obs(job=TWO, pods=(zero, bound)))
    assert status.placement is not None and status.placement.nodes == ["n1", "n2"]
    # a replaced pod: its index's newest pod counts
    again = pod("Running", "n3", name="p1b", index=1, created="2026-01-01T00:01:00Z")
    failed = dataclasses.replace(bound, phase="Failed")
    status, _ = derive(status, obs(job=TWO, pods=(zero, failed, again)))
    assert status.placement is not None and status.placement.nodes == ["n1", "n3"]
