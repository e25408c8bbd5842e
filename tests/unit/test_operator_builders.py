"""The children the operator creates, built without a cluster."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from finetune_api.resource import FineTuneJobSpec
from finetune_api.trainer_config import TrainerConfig
from finetune_operator import builders
from finetune_operator.builders import JobIdentity
from finetune_operator.placement import gpu_requirement
from finetune_operator.settings import Settings
from podsecurity import restricted_violations

JOB = JobIdentity(name="llama-sft", namespace="ml", uid="0000-1111", generation=3)
SERIALIZE = ApiClient().sanitize_for_serialization


def spec(**extra: Any) -> FineTuneJobSpec:
    body: dict[str, Any] = {
        "dataset": {"claimName": "data", "path": "sets/train.jsonl"},
        "output": {"claimName": "adapters", "path": "llama-sft"},
        "training": {"quantize_model": True, "quantization_scheme": "bnb-4bit"},
    }
    body.update(extra)
    return FineTuneJobSpec.model_validate(body)


def job_dict(s: FineTuneJobSpec, settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    built = builders.build_job(JOB, s, gpu_requirement(s, settings), settings)
    result: dict[str, Any] = SERIALIZE(built)
    return result


def pod(s: FineTuneJobSpec, settings: Settings | None = None) -> dict[str, Any]:
    result: dict[str, Any] = job_dict(s, settings)["spec"]["template"]["spec"]
    return result


def test_pod_meets_restricted_pod_security() -> None:
    p = pod(spec(model={"volume": {"claimName": "models", "path": "llama"}}))
    assert restricted_violations(p) == []
    container = p["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/cache", "/dev/shm"} <= mounts


def test_the_checker_catches_violations() -> None:
    p = pod(spec())
    p["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    p["hostNetwork"] = True
    p["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(p)) == 3


def test_gpu_request_toleration_and_user_placement() -> None:
    s = spec(
        training={
            "quantize_model": True,
            "quantization_scheme": "bnb-4bit",
            "pretrained_model": "acme/unlisted",
        },
        resources={"gpus": 2, "cpu": 8, "memory": "64Gi"},
        placement={
            "nodeSelector": {"pool": "training"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
            ],
            "priorityClassName": "batch-low",
        },
    )
    p = pod(s)
    resources = p["containers"][0]["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"}
    assert resources["requests"] == resources["limits"]
    assert p["nodeSelector"] == {"pool": "training"}
    assert p["priorityClassName"] == "batch-low"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in p[
        "tolerations"
    ]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in p[
        "tolerations"
    ]
    terms = p["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["7"]}
            ]
        }
    ]


def test_operator_defaults_fill_unset_cpu_memory() -> None:
    p = pod(spec(), Settings(default_cpu="4", default_memory="32Gi", trainer_image="registry/t:1"))
    assert p["containers"][0]["resources"]["limits"] == {
        "nvidia.com/gpu": "1",
        "cpu": "4",
        "memory": "32Gi",
    }
    assert p["containers"][0]["image"] == "registry/t:1"
    assert pod(spec(image="mine:2"))["containers"][0]["image"] == "mine:2"


def test_hub_token_comes_from_the_secret_by_reference() -> None:
    p = pod(
        spec(model={"hub": {"tokenSecretRef": {"name": "hf", "key": "tok"}, "revision": "abc"}})
    )
    env = {e["name"]: e for e in p["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}},
    }
    assert "HF_HUB_OFFLINE" not in env
    assert env["FINETUNE_JOB_NAME"]["value"] == "llama-sft"


def test_volumes_one_per_claim_read_only_unless_written() -> None:
    p = pod(spec(model={"volume": {"claimName": "data", "path": "models/llama"}}))
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"].get("readOnly")
        for v in p["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"data": True, "adapters": False}
    mounts = {m["mountPath"]: m.get("readOnly") for m in p["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/data"] is True and mounts["/mnt/pvc/adapters"] is False
    env = {e["name"]: e.get("value") for e in p["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    same = pod(spec(output={"claimName": "data", "path": "out"}))
    assert [
        v["persistentVolumeClaim"] for v in same["volumes"] if "persistentVolumeClaim" in v
    ] == [{"claimName": "data", "readOnly": False}]


def test_job_shape_and_owner() -> None:
    j = job_dict(spec(backoffLimit=4, activeDeadlineSeconds=7200))
    assert j["metadata"]["name"] == "llama-sft-train"
    assert j["spec"]["backoffLimit"] == 4 and j["spec"]["activeDeadlineSeconds"] == 7200
    assert j["spec"]["parallelism"] == 1 and j["spec"]["completions"] == 1
    assert j["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    (owner,) = j["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "llama-sft",
        "uid": "0000-1111",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert j["spec"]["template"]["metadata"]["labels"]["finetune.dev/job-uid"] == "0000-1111"
    assert j["spec"]["suspend"] is False
    suspended = job_dict(spec(suspend=True))["spec"]
    assert suspended["suspend"] is True and suspended["parallelism"] == 1


def test_job_uses_pod_failure_policy_and_waits_for_failed_pods() -> None:
    j = job_dict(spec())["spec"]
    assert j["podReplacementPolicy"] == "Failed"
    fail, stopped, ignore = j["podFailurePolicy"]["rules"]
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
    }
    assert stopped == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]},
    }
    assert ignore == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert j["template"]["spec"]["containers"][0]["name"] == "trainer"


def test_names_are_deterministic_and_short() -> None:
    assert builders.job_name("a") == "a-train"
    long = "x" * 200
    name = builders.job_name(long)
    assert len(name) <= 52 and name.endswith("-train") and name == builders.job_name(long)
    assert builders.job_name("x" * 199 + "y") != name


def test_spec_hash_ignores_suspend_only() -> None:
    assert builders.spec_hash(spec()) == builders.spec_hash(spec(suspend=True))
    assert builders.spec_hash(spec()) != builders.spec_hash(spec(training={"lora_r": 8}))


def test_the_pod_carries_the_resolved_trainer_config() -> None:
    """No ConfigMap: the pod template's annotation holds the config, and a downward API volume
    makes it the file the trainer's --job names."""
    s = spec(model={"volume": {"claimName": "models", "path": "./llama//3b"}})
    template = builders.build_job(JOB, s, gpu_requirement(s, Settings()), Settings()).spec.template
    text = template.metadata.annotations["finetune.dev/trainer-config"]
    config = TrainerConfig.model_validate(yaml.safe_load(text))
    assert config.spec == s
    assert config.paths.model == "/mnt/pvc/models/llama/3b"
    assert config.paths.dataset == "/mnt/pvc/data/sets/train.jsonl"
    assert config.paths.output == "/mnt/pvc/adapters/llama-sft"
    assert config.min_compute_capability == "8.0"
    assert config.adapter_uri == "pvc://adapters/llama-sft"
    assert config.job is not None and config.job.uid == "0000-1111"
    (volume,) = [v for v in template.spec.volumes if v.name == "config"]
    (item,) = volume.downward_api.items
    assert item.field_ref.field_path == "metadata.annotations['finetune.dev/trainer-config']"
    container = template.spec.containers[0]
    (mount,) = [m for m in container.volume_mounts if m.name == "config"]
    assert mount.read_only and container.args == ["--job", f"{mount.mount_path}/{item.path}"]


@pytest.mark.parametrize("reporting", [True, False])
def test_service_account_only_when_reporting(reporting: bool) -> None:
    p = pod(spec(), Settings(status_reporting=reporting))
    assert p.get("serviceAccountName") == ("finetune-trainer" if reporting else None)
    assert p["automountServiceAccountToken"] is reporting
