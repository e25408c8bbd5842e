"""Faults a new user or an unlucky cluster produces (issue 14), on the real control plane: a child
the cluster refuses, a quota, deleted children, a finished job whose Job is cleaned up, a pod the
Job controller cannot create, and the schema edges of server-side apply."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_api.trainer_config import TrainerOutcome
from finetune_operator.kube import Kube
from gpusim import FakeKubelet
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
from integration.policies import refusing_images

pytestmark = pytest.mark.integration


def status(ns: Namespace, name: str) -> dict[str, Any]:
    return dict(ns.ftj(name).get("status") or {})


def condition(ns: Namespace, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(ns, name).get("conditions", []) if c["type"] == type_), {})


def warnings(ns: Namespace, name: str) -> list[tuple[str, str]]:
    events = ns.cluster.core.list_namespaced_event(
        ns.name, field_selector=f"involvedObject.name={name},type=Warning"
    )
    return [(e.reason, e.message) for e in events.items]


def children(ns: Namespace, uid: str | None) -> list[str]:
    """Every child the operator made for the FineTuneJob with this uid, as 'Kind/name' (with
    None: the namespace's trainer identity)."""
    core, rbac = ns.cluster.core, client.RbacAuthorizationV1Api(ns.cluster.api)
    selector = f"finetune.dev/job-uid={uid}"
    listers = {
        "Job": ns.cluster.batch.list_namespaced_job,
        "ServiceAccount": core.list_namespaced_service_account,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
    }
    if uid is None:  # the namespace's trainer identity, shared by its jobs
        selector = "app.kubernetes.io/component=trainer-identity"
    return sorted(
        f"{kind}/{item.metadata.name}"
        for kind, lister in listers.items()
        for item in lister(ns.name, label_selector=selector).items
    )


def apply_server_side(ns: Namespace, manifest: dict[str, Any]) -> Any:
    return ns.cluster.kubectl(
        "apply", "--server-side", "-n", ns.name, "-f", "-", input=yaml.safe_dump(manifest),
        check=False,
    )  # fmt: skip


def test_server_side_apply_takes_a_safe_synthesizer_null_and_refuses_integer_zero(
    namespace: Namespace,
) -> None:
    dump = ftj_manifest("dump", {"quantize_model": True, "quantization_scheme": None})
    result = apply_server_side(namespace, {**dump, "spec": {**dump["spec"], "suspend": True}})
    assert result.returncode == 0, result.stderr
    wait_for(lambda: status(namespace, "dump").get("phase") == "Suspended", what="Suspended")
    assert condition(namespace, "dump", "Validated")["status"] == "True"
    result = apply_server_side(namespace, ftj_manifest("zero", {"lora_alpha_over_r": 0}))
    assert result.returncode != 0
    # Kubernetes 1.37 quotes the value of a CEL error, 1.34 its type.
    assert re.search(
        r'spec\.training\.lora_alpha_over_r: Invalid value: (0|"number"): should be greater than or '
        r"equal to 0\.5",
        result.stderr,
    ), result.stderr
    result = apply_server_side(namespace, ftj_manifest("int4", {"quantization_scheme": "int4"}))
    assert re.search(
        r'spec\.training\.quantization_scheme: Invalid value: "(int4|string)": must be one of '
        r"bnb-4bit, bnb-8bit, fp8, nvfp4, mxfp4",
        result.stderr,
    ), result.stderr


@pytest.fixture
def refusing_policy(namespace: Namespace) -> Iterator[str]:
    with refusing_images(namespace) as name:
        yield name


def test_child_refused_by_the_clusters_admission_is_reported_once_and_leaves_nothing(
    namespace: Namespace, refusing_policy: str, operator: Operator
) -> None:
    manifest = ftj_manifest("img", scheme_training("bnb-4bit"), image="refused:1")
    assert namespace.apply(manifest).returncode == 0
    wait_for(lambda: status(namespace, "img").get("phase") == "Failed", what="Failed")
    ready = condition(namespace, "img", "ChildrenReady")
    assert (ready["status"], ready["reason"]) == ("False", "ChildRejected")
    assert ready["message"].startswith("Job img-train refused: ")
    assert "images named refused are not allowed in this namespace" in ready["message"]
    assert condition(namespace, "img", "Failed")["reason"] == "ChildRejected"
    wait_for(
        lambda: any(r == "ChildRejected" and "img-train" in m for r, m in warnings(namespace, "img")),
        what="a Warning Event naming the Job",
    )  # fmt: skip
    uid = namespace.ftj("img")["metadata"]["uid"]
    assert children(namespace, uid) == []  # no Job
    # Not retried: kopf was told it is permanent; nothing changes over the next seconds.
    before = status(namespace, "img")
    time.sleep(5)
    assert status(namespace, "img") == before
    assert "failed permanently" in operator.log()


def test_quota_refusal_is_retried_and_heals_when_the_quota_allows(
    namespace: Namespace,
) -> None:
    core = namespace.cluster.core
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-jobs"),
        spec=client.V1ResourceQuotaSpec(hard={"count/jobs.batch": "0"}),
    )
    core.create_namespaced_resource_quota(namespace.name, quota)
    wait_for(
        lambda: core.read_namespaced_resource_quota("no-jobs", namespace.name).status.hard,
        what="quota observed",
    )
    manifest = ftj_manifest("quota", scheme_training("bnb-4bit"), suspend=True)
    assert namespace.apply(manifest).returncode == 0
    wait_for(
        lambda: condition(namespace, "quota", "ChildrenReady").get("reason") == "ChildCreateFailed",
        what="ChildCreateFailed",
        describe=lambda: status(namespace, "quota"),
    )
    assert status(namespace, "quota")["phase"] == "Pending"
    assert "exceeded quota" in condition(namespace, "quota", "ChildrenReady")["message"]
    assert children(namespace, namespace.ftj("quota")["metadata"]["uid"]) == []
    core.delete_namespaced_resource_quota("no-jobs", namespace.name)
    wait_for(
        lambda: status(namespace, "quota").get("phase") == "Suspended",
        timeout=100,
        what="created once the quota allows it",
        describe=lambda: status(namespace, "quota"),
    )
    assert condition(namespace, "quota", "ChildrenReady")["status"] == "True"


def test_deleted_children_are_made_again_within_seconds(namespace: Namespace) -> None:
    assert namespace.apply(ftj_manifest("heal", scheme_training("bnb-4bit"))).returncode == 0
    wait_for(lambda: status(namespace, "heal").get("phase") == "Running", what="Running")
    uid = namespace.ftj("heal")["metadata"]["uid"]
    before = children(namespace, uid)
    identity = ["Role/finetune-trainer", "RoleBinding/finetune-trainer",
                "ServiceAccount/finetune-trainer"]  # fmt: skip
    assert before == ["Job/heal-train"]
    assert children(namespace, None) == identity
    old_job = namespace.jobs()[0].metadata.uid
    for kind, name in (("job", "heal-train"), ("role", "finetune-trainer"),
                       ("serviceaccount", "finetune-trainer")):  # fmt: skip
        namespace.cluster.kubectl("delete", kind, name, "-n", namespace.name, "--wait=false")
    wait_for(
        lambda: (
            children(namespace, uid) == before
            and children(namespace, None) == identity
            and namespace.jobs()[0].metadata.uid != old_job
        ),
        timeout=20,
        what="every child made again",
        describe=lambda: (children(namespace, uid), children(namespace, None)),
    )
    # The status follows the new Job (no stale Running=True from the old one meanwhile).
    wait_for(
        lambda: (
            status(namespace, "heal").get("phase") == "Running"
            and status(namespace, "heal").get("jobName") == "heal-train"
        ),
        timeout=60,
        what="Running again",
    )


def test_the_periodic_check_asks_the_api_server_whether_a_job_lost_its_job(
    namespace: Namespace,
) -> None:
    """Before making a Job again, the periodic check confirms with the API server that it is gone
    (in a burst the watch caches lag behind the Jobs the operator made)."""
    kube = Kube(namespace.cluster.api)
    assert namespace.apply(ftj_manifest("look", scheme_training("bnb-4bit"))).returncode == 0
    wait_for(namespace.jobs, what="the Job")
    assert kube.job_exists(namespace.name, "look-train")
    assert not kube.job_exists(namespace.name, "nothing-train")


def test_pod_the_job_controller_cannot_create_is_explained(namespace: Namespace) -> None:
    manifest = ftj_manifest(
        "prio", scheme_training("bnb-4bit"), placement={"priorityClassName": "does-not-exist"}
    )
    assert namespace.apply(manifest).returncode == 0
    wait_for(
        lambda: condition(namespace, "prio", "Scheduled").get("reason") == "FailedCreate",
        timeout=90,
        what="Scheduled=False FailedCreate",
        describe=lambda: status(namespace, "prio"),
    )
    scheduled = condition(namespace, "prio", "Scheduled")
    assert scheduled["status"] == "False"
    assert scheduled["message"].startswith("the Job controller cannot create the training pod: ")
    assert "does-not-exist" in scheduled["message"]
    assert "does-not-exist" in status(namespace, "prio")["message"]


def test_finished_job_stays_finished_when_its_job_is_deleted_even_after_a_restart(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    op = Operator(cluster, tmp_path / "final.log", "--namespace", "f-*").start()
    ns = make_namespace(cluster, tmp_path, prefix="f")
    try:
        assert ns.apply(ftj_manifest("done", scheme_training("bnb-4bit"))).returncode == 0
        pod = wait_for(
            lambda: next((p for p in ns.pods("done") if p.status.phase == "Running"), None),
            what="a running pod",
        )
        outcome = TrainerOutcome(outcome="Succeeded", reason="Completed", message="ok",
                                 result={"adapter": "pvc://out/done", "steps": 3})  # fmt: skip
        kubelet.finish(pod, 0, outcome.model_dump_json(by_alias=True, exclude_none=True))
        wait_for(lambda: status(ns, "done").get("phase") == "Succeeded", what="Succeeded")
        result = status(ns, "done")["result"]
        ns.cluster.kubectl("delete", "job", "done-train", "-n", ns.name)
        wait_for(
            lambda: condition(ns, "done", "ChildrenReady").get("reason") == "JobDeletedAfterFinish",
            what="the missing Job reported",
            describe=lambda: status(ns, "done"),
        )
        assert "never run again" in condition(ns, "done", "ChildrenReady")["message"]
        for _ in range(2):  # a restart (resume) must not run it again either
            op.kill()
            op.start()
            time.sleep(8)
            assert ns.jobs() == []
            assert not [p for p in ns.pods("done") if p.status.phase in ("Pending", "Running")]
            final = status(ns, "done")
            assert final["phase"] == "Succeeded" and final["result"] == result
            assert condition(ns, "done", "Complete")["status"] == "True"
            assert condition(ns, "done", "Running").get("status") != "True"
    finally:
        remove_namespace(ns)
        op.stop()


def largest_spec() -> dict[str, Any]:
    """A valid spec with every string, list and map at its maximum size."""
    label_key = "p" * 253 + "/" + "n" * 63
    model = "m" * 4096
    return {
        "model": {"hub": {"id": model, "revision": "r" * 256,
                          "tokenSecretRef": {"name": "s" * 253, "key": "k" * 253}}},
        "dataset": {"claimName": "d" * 253, "path": "d" * 4090 + ".jsonl", "textField": "t" * 256},
        "output": {"claimName": "o" * 253, "path": "o" * 4096},
        "resources": {"cpu": "1" * 64, "memory": "2" * 64},
        "placement": {
            "nodeSelector": {f"{i:02d}{label_key[2:]}": "v" * 63 for i in range(64)},
            "tolerations": [{"key": f"{i:02d}{label_key[2:]}", "value": "v" * 63}
                            for i in range(32)],
            "priorityClassName": "c" * 253,
        },
        "image": "i" * 4096,
        "suspend": True,
        "training": {"pretrained_model": model,
                     "lora_target_modules": [f"{i:02d}" + "x" * 254 for i in range(64)],
                     "attn_implementation": "a" * 256},
    }  # fmt: skip


def test_the_largest_spec_fits_the_pod_templates_annotation(namespace: Namespace) -> None:
    """The trainer's config (the whole spec) travels in an annotation of the Job's pod template
    (all annotations together: 256 KiB)."""
    manifest = {**ftj_manifest("big"), "spec": largest_spec()}
    assert len(json.dumps(manifest)) > 75_000
    result = apply_server_side(namespace, manifest)
    assert result.returncode == 0, result.stderr[:2000]
    wait_for(
        lambda: status(namespace, "big").get("phase") == "Suspended",
        what="Suspended",
        describe=lambda: status(namespace, "big"),
    )
    (job,) = namespace.jobs()
    assert "m" * 4096 in job.spec.template.metadata.annotations["finetune.dev/trainer-config"]
