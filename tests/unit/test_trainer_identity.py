"""The trainer's namespace identity and the admission policy that narrows it (pure builders; the
policy's behaviour against the real API server: tests/integration/test_trainer_status_api.py)."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from finetune_api.resource import FineTuneJobStatus
from finetune_operator import builders, trainer_identity

SERIALIZE = client.ApiClient().sanitize_for_serialization


def test_the_role_may_only_patch_status_and_binds_the_namespaces_account() -> None:
    account, role, binding = (SERIALIZE(o) for o in trainer_identity.build_identity("ml"))
    assert account["metadata"] == {
        "name": "finetune-trainer",
        "namespace": "ml",
        "labels": trainer_identity.IDENTITY_LABELS,
    }
    assert role["rules"] == [
        {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"], "verbs": ["patch"]}
    ]
    assert binding["roleRef"]["name"] == "finetune-trainer"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "finetune-trainer", "namespace": "ml"}
    ]
    assert all(trainer_identity.is_identity(o) for o in trainer_identity.build_identity("ml"))
    assert not trainer_identity.is_identity(
        builders.build_workers_service(builders.JobIdentity("j", "ml", "u"))
    )


def test_the_policy_holds_every_status_field_but_progress() -> None:
    """A status field added to the model is guarded without anyone remembering the policy."""
    spec: dict[str, Any] = SERIALIZE(trainer_identity.build_policy())["spec"]
    own_pod, unchanged = spec["validations"]
    fields = {info.alias or name for name, info in FineTuneJobStatus.model_fields.items()}
    assert "progress" in fields and "jobName" in fields
    for field in fields - {"progress"}:
        assert f"object.status.{field} == oldObject.status.{field}" in unchanged["expression"]
    assert "object.status.progress" not in unchanged["expression"]
    assert trainer_identity.POD_NAME_CLAIM in spec["variables"][1]["expression"]
    assert (
        "'system:serviceaccount:' + request.namespace + ':finetune-trainer'"
        in (spec["matchConditions"][0]["expression"])
    )
    assert spec["failurePolicy"] == "Fail" and own_pod["reason"] == "Forbidden"


def test_the_policy_computes_the_same_job_name_as_the_operator() -> None:
    """Names up to the plain limit give <name>-train, as builders.job_name does; one character
    more gets a hash, which the policy reads from status.jobName instead."""
    limit = trainer_identity.LONGEST_PLAIN_NAME
    assert builders.job_name("a" * limit) == "a" * limit + "-train"
    assert builders.job_name("a" * (limit + 1)) != "a" * (limit + 1) + "-train"
    job = SERIALIZE(trainer_identity.build_policy())["spec"]["variables"][0]["expression"]
    assert job.startswith(f"size(request.name) <= {limit} ? request.name + '-train'")
    binding = SERIALIZE(trainer_identity.build_policy_binding())
    assert binding["spec"] == {
        "policyName": trainer_identity.POLICY,
        "validationActions": ["Deny"],
    }
