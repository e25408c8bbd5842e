"""A FineTuneJob's life on the real control plane: validation, children, status, deletion, restarts."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_api.trainer_config import TrainerOutcome
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

pytestmark = pytest.mark.integration


def phase(ns: Namespace, name: str) -> str | None:
    return ns.ftj(name).get("status", {}).get("phase")


def running_pod(ns: Namespace, name: str) -> Any:
    def find() -> Any:
        pods = [p for p in ns.pods(name) if p.status.phase == "Running"]
        return pods[0] if pods else None

    return wait_for(find, timeout=60, what=f"a running pod of {name}")


def wait_event(ns: Namespace, name: str, match: Callable[[Any], bool]) -> None:
    """Events are posted asynchronously: wait for a matching one rather than sample once."""
    wait_for(lambda: any(match(e) for e in events(ns, name)), timeout=30, what=f"an event on {name}",
             describe=lambda: [(e.type, e.reason, e.message) for e in events(ns, name)])  # fmt: skip


def events(ns: Namespace, name: str) -> list[Any]:
    return list(
        ns.cluster.core.list_namespaced_event(
            ns.name, field_selector=f"involvedObject.name={name}"
        ).items
    )


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"lora_r": 0}, "spec.training.lora_r"),
        ({"learning_rate": 3}, "spec.training.learning_rate"),
        ({"quantization_scheme": "int3"}, "spec.training.quantization_scheme"),
        ({"lora_alpha_over_r": 4}, "spec.training.lora_alpha_over_r"),
        ({"num_input_records_to_sample": "plenty"}, "spec.training.num_input_records_to_sample"),
    ],
)
def test_kubectl_apply_refuses_invalid_values_naming_the_field(
    namespace: Namespace, training: dict[str, Any], field: str
) -> None:
    result = namespace.apply(ftj_manifest("bad", training))
    assert result.returncode != 0
    assert field in result.stderr
    assert not namespace.cluster.custom.list_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace.name, "finetunejobs"
    )["items"]


def test_example_and_safe_synthesizer_block_pass_server_validation(namespace: Namespace) -> None:
    repo = Path(__file__).resolve().parents[2]
    result = namespace.cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace.name,
        "-f",
        str(repo / "examples" / "finetune.yaml"),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # A Safe Synthesizer `training:` block, snake_case, pasted unchanged (every field set).
    safe_synth = {
        "num_input_records_to_sample": 5000, "batch_size": 2, "gradient_accumulation_steps": 4,
        "weight_decay": 0.01, "warmup_ratio": 0.1, "lr_scheduler": "linear", "learning_rate": 0.0005,
        "lora_r": 16, "lora_alpha_over_r": 2.0, "lora_target_modules": ["q_proj", "v_proj"],
        "rope_scaling_factor": 2, "validation_ratio": 0.1, "validation_steps": 20,
        "pretrained_model": "meta-llama/Llama-3.2-1B", "quantize_model": True,
        "quantization_bits": 4, "quantization_scheme": "bnb-4bit", "peft_implementation": "QLORA",
        "max_vram_fraction": 0.9, "attn_implementation": "sdpa",
    }  # fmt: skip
    manifest = ftj_manifest("pasted", safe_synth)
    result = namespace.cluster.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-n", namespace.name, "-f", "-",
        input=json.dumps(manifest), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"]["training"] == safe_synth


def test_kubectl_explain_explains_training_fields(namespace: Namespace) -> None:
    result = namespace.cluster.kubectl("explain", "finetunejob.spec.training.lora_r")
    assert "Rank of the LoRA update matrices" in result.stdout
    result = namespace.cluster.kubectl("explain", "ftj.spec.dataset.promptField")
    assert "Column holding the prompt" in result.stdout


def test_cross_field_error_is_refused_at_apply_and_a_fix_runs(namespace: Namespace) -> None:
    """The CRD's CEL rule refuses it: no object, so the operator never makes children."""
    training = {
        "quantize_model": True,
        "quantization_scheme": "nvfp4",
        "peft_implementation": "loftq",
    }
    result = namespace.apply(ftj_manifest("loftq-fp4", training))
    assert result.returncode != 0
    assert "spec.training.quantization_scheme: Invalid value" in result.stderr
    assert (
        "peft_implementation loftq cannot be used with quantization_scheme nvfp4: LoftQ needs a "
        "bitsandbytes scheme (bnb-4bit or bnb-8bit), and Safe Synthesizer's LoRA setup fails on "
        "any other"
    ) in result.stderr
    assert namespace.jobs() == []
    # Fixing the spec: accepted, validated and training starts.
    fixed = ftj_manifest("loftq-fp4", {**training, "peft_implementation": "QLORA"})
    assert namespace.apply(fixed).returncode == 0
    wait_for(
        lambda: (namespace.condition("loftq-fp4", "Validated") or {}).get("status") == "True",
        what="Validated=True",
    )
    wait_for(lambda: phase(namespace, "loftq-fp4") == "Running", timeout=60, what="Running")


def test_success_fills_result_and_events(namespace: Namespace, kubelet: FakeKubelet) -> None:
    assert namespace.apply(ftj_manifest("ok", scheme_training("bnb-4bit"))).returncode == 0
    pod = running_pod(namespace, "ok")
    wait_for(lambda: phase(namespace, "ok") == "Running", what="Running")
    outcome = TrainerOutcome(
        outcome="Succeeded",
        reason="Completed",
        message="trained 12 steps",
        result={
            "adapter": "pvc://out/ok",
            "steps": 12,
            "recordsSeen": 96,
            "finalLoss": 0.42,
            "durationSeconds": 3.5,
        },
    )
    kubelet.finish(pod, 0, outcome.model_dump_json(by_alias=True, exclude_none=True))
    wait_for(lambda: phase(namespace, "ok") == "Succeeded", timeout=60, what="Succeeded")
    status = namespace.ftj("ok")["status"]
    assert status["result"] == {
        "adapter": "pvc://out/ok",
        "steps": 12,
        "recordsSeen": 96,
        "finalLoss": 0.42,
        "durationSeconds": 3.5,
    }
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True" and complete["reason"] == "Completed"
    # GitOps: through the whole life the operator never wrote to spec (no new generation).
    assert namespace.ftj("ok")["metadata"]["generation"] == 1
    assert status["startTime"] and status["completionTime"]
    wait_event(namespace, "ok", lambda e: e.reason == "Running")
    wait_event(namespace, "ok", lambda e: e.reason == "Completed")


def test_failure_carries_the_trainers_reason(namespace: Namespace, kubelet: FakeKubelet) -> None:
    assert (
        namespace.apply(
            ftj_manifest("boom", scheme_training("bnb-8bit"), backoffLimit=0)
        ).returncode
        == 0
    )
    pod = running_pod(namespace, "boom")
    line = "CUDA out of memory while training step 3"
    outcome = TrainerOutcome(outcome="Failed", reason="TrainingError", message=line)
    kubelet.finish(pod, 1, outcome.model_dump_json())
    wait_for(lambda: phase(namespace, "boom") == "Failed", timeout=60, what="Failed")
    failed = namespace.condition("boom", "Failed")
    assert failed is not None and failed["status"] == "True"
    assert failed["message"] == line
    assert failed["reason"] == "BackoffLimitExceeded"
    wait_event(namespace, "boom", lambda e: e.type == "Warning" and line in e.message)


def test_invalid_input_is_not_retried(namespace: Namespace, kubelet: FakeKubelet) -> None:
    assert (
        namespace.apply(
            ftj_manifest("nodata", scheme_training("bnb-4bit"), backoffLimit=3)
        ).returncode
        == 0
    )
    pod = running_pod(namespace, "nodata")
    line = "dataset /mnt/pvc/data/train.jsonl: file is empty"
    kubelet.finish(
        pod, 2, json.dumps({"outcome": "Failed", "reason": "InvalidInput", "message": line})
    )
    wait_for(lambda: phase(namespace, "nodata") == "Failed", timeout=60, what="Failed")
    failed = namespace.condition("nodata", "Failed")
    assert failed is not None and (failed["reason"], failed["message"]) == ("InvalidInput", line)
    # The Job's own pod failure policy fails it at once: no retry is even started.
    job = wait_for(lambda: job_failed(namespace, "PodFailurePolicy"), what="Job failed by policy")
    time.sleep(3)
    assert len(namespace.pods("nodata")) == 1, "no second attempt"
    assert job.metadata.name == "nodata-train" and job.spec.suspend is False


def job_failed(ns: Namespace, reason: str) -> Any:
    """The FineTuneJob's Job, once the Job controller has failed it for `reason`."""
    for job in ns.jobs():
        for condition in job.status.conditions or []:
            if (condition.type, condition.status, condition.reason) == ("Failed", "True", reason):
                return job
    return None


def test_plain_text_termination_message_reaches_the_condition(
    namespace: Namespace, kubelet: FakeKubelet
) -> None:
    assert (
        namespace.apply(ftj_manifest("crash", scheme_training(None), backoffLimit=0)).returncode
        == 0
    )
    pod = running_pod(namespace, "crash")
    kubelet.finish(pod, 137, "Traceback ...\nRuntimeError: the trainer was killed\n")
    wait_for(lambda: phase(namespace, "crash") == "Failed", timeout=60, what="Failed")
    assert (namespace.condition("crash", "Failed") or {})[
        "message"
    ] == "RuntimeError: the trainer was killed"


def test_suspend_and_resume(namespace: Namespace) -> None:
    assert (
        namespace.apply(ftj_manifest("later", scheme_training("fp8"), suspend=True)).returncode == 0
    )
    wait_for(lambda: phase(namespace, "later") == "Suspended", what="Suspended")
    assert (namespace.condition("later", "Suspended") or {})["status"] == "True"
    time.sleep(2)
    assert namespace.pods("later") == []
    (job,) = namespace.jobs()  # the Job exists, held by its own native suspend
    assert job.spec.suspend is True and job.spec.parallelism == 1
    assert (
        namespace.apply(ftj_manifest("later", scheme_training("fp8"), suspend=False)).returncode
        == 0
    )
    wait_for(
        lambda: phase(namespace, "later") == "Running", timeout=60, what="Running after resume"
    )
    assert (namespace.condition("later", "Suspended") or {})["status"] == "False"
    assert namespace.condition("later", "SpecChanged") is None  # suspend is not a spec change
    # Suspending a running job stops its pod.
    assert (
        namespace.apply(ftj_manifest("later", scheme_training("fp8"), suspend=True)).returncode == 0
    )
    wait_for(lambda: phase(namespace, "later") == "Suspended", what="Suspended again")
    wait_for(lambda: not namespace.pods("later"), timeout=60, what="pod stopped")
    (job,) = namespace.jobs()
    assert job.spec.suspend is True and not job.status.failed, "a suspended pod is no failure"


def test_spec_change_after_start_is_reported_not_applied(namespace: Namespace) -> None:
    assert namespace.apply(ftj_manifest("steady", scheme_training("bnb-4bit"))).returncode == 0
    wait_for(lambda: phase(namespace, "steady") == "Running", timeout=60, what="Running")
    job_before = namespace.jobs()[0]
    assert (
        namespace.apply(
            ftj_manifest("steady", {**scheme_training("bnb-4bit"), "lora_r": 8})
        ).returncode
        == 0
    )
    cond = wait_for(
        lambda: (
            (namespace.condition("steady", "SpecChanged") or {}).get("status") == "True"
            and namespace.condition("steady", "SpecChanged")
        ),
        what="SpecChanged",
    )
    assert "Delete and re-create" in cond["message"]
    assert namespace.ftj("steady")["status"]["observedGeneration"] == 2
    # The spec change was noticed from the operator's memory of the last handled spec: kopf's
    # bookkeeping is not written onto the object (no annotation, and no PATCH for one).
    annotations = namespace.ftj("steady")["metadata"].get("annotations") or {}
    assert not [k for k in annotations if k.startswith("finetune.dev/")], annotations
    job_after = namespace.jobs()[0]
    assert job_after.metadata.uid == job_before.metadata.uid
    assert job_after.spec.template.metadata.annotations == (
        job_before.spec.template.metadata.annotations
    )  # the trainer's config with it
    assert phase(namespace, "steady") == "Running"


def test_children_are_owned_and_deleted_with_the_job(namespace: Namespace) -> None:
    assert namespace.apply(ftj_manifest("owned", scheme_training("bnb-4bit"))).returncode == 0
    wait_for(lambda: phase(namespace, "owned") == "Running", timeout=60, what="Running")
    core = namespace.cluster.core
    rbac_api = client.RbacAuthorizationV1Api(namespace.cluster.api)
    uid = namespace.ftj("owned")["metadata"]["uid"]
    # No finalizer: deleting a FineTuneJob never waits for the operator (owner references do the
    # clean-up), so an uninstalled operator leaves no undeletable objects behind.
    assert not namespace.ftj("owned")["metadata"].get("finalizers")
    children = [namespace.jobs()[0]]
    for child in children:
        (owner,) = child.metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == ("FineTuneJob", uid, True)
    # The namespace's trainer identity is shared by its jobs: owned by none, kept after them.
    identity = [
        core.read_namespaced_service_account("finetune-trainer", namespace.name),
        rbac_api.read_namespaced_role("finetune-trainer", namespace.name),
        rbac_api.read_namespaced_role_binding("finetune-trainer", namespace.name),
    ]
    assert all(not part.metadata.owner_references for part in identity)
    (rule,) = identity[1].rules
    assert (rule.resources, rule.verbs, rule.resource_names) == (
        ["finetunejobs/status"], ["patch"], None,
    )  # fmt: skip
    assert namespace.jobs()[0].spec.template.spec.service_account_name == "finetune-trainer"

    namespace.cluster.kubectl("delete", "ftj", "owned", "-n", namespace.name)

    def gone() -> bool:
        return (
            not namespace.jobs()
            and not core.list_namespaced_pod(
                namespace.name, label_selector=f"finetune.dev/job-uid={uid}"
            ).items
        )

    wait_for(gone, timeout=90, what="children garbage-collected")
    assert core.read_namespaced_service_account("finetune-trainer", namespace.name)


def test_operator_killed_mid_reconcile_never_makes_a_second_job(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    op = Operator(cluster, tmp_path / "chaos.log", "--namespace", "r-*")
    ns = make_namespace(cluster, tmp_path, prefix="r")
    rng = random.Random(7)
    try:
        for i in range(3):
            assert ns.apply(ftj_manifest(f"chaos-{i}", scheme_training("bnb-4bit"))).returncode == 0
        for _ in range(6):  # kill at random points of the reconciliation, several times
            op.start()
            time.sleep(rng.uniform(0.8, 3.0))
            op.kill()
        op.start()
        for i in range(3):
            wait_for(
                lambda n=f"chaos-{i}": (
                    phase(ns, n) in ("Running", "Pending") and ns.ftj(n)["status"].get("jobName")
                ),
                timeout=60,
                what=f"chaos-{i} reconciled",
            )
        time.sleep(3)
        jobs = ns.jobs()
        assert sorted(j.metadata.name for j in jobs) == [
            "chaos-0-train",
            "chaos-1-train",
            "chaos-2-train",
        ]
        for i in range(3):
            assert len(ns.pods(f"chaos-{i}")) == 1
    finally:
        remove_namespace(ns)
        op.stop()
