"""End to end on the real node: kubectl apply -> operator -> kube-scheduler -> the kubelet runs the
trainer image in containerd, and it trains.

The training pod is the operator's, unchanged: the trainer reads the config the operator put in
its pod (a downward API volume), the PersistentVolumes and its projected service-account token
inside a real container (UID 65532, read-only root filesystem, restricted namespace), reports
progress as its namespace's trainer account, and writes its one-line failure to the container's
termination message. `kubectl delete pod` is the kubelet's SIGTERM to the container. Needs root
and the images (hack/images.sh).
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from realnode import RealNode

from finetune_operator.trainer_identity import ACCOUNT
from integration.harness import Cluster, Namespace, service_account_token, wait_for
from nodetier import NODE, OnNode, get_wide, seed_volumes, tiny_job, trainer_namespace
from tinymodel import TINY_QLORA

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1800)]


@pytest.fixture
def e2e(
    node_cluster: Cluster, real_node: RealNode, trainer_image: str, volume_root: Path,
    tmp_path: Path,
) -> Iterator[OnNode]:  # fmt: skip
    with trainer_namespace(node_cluster, trainer_image, volume_root, tmp_path) as on_node:
        yield on_node


def test_train_watch_progress_and_resume_a_deleted_pod_without_a_retry(e2e: OnNode) -> None:
    """`kubectl get ftj` shows progress and loss while the trainer image trains, `kubectl logs`
    its log. Then `kubectl delete pod` mid-run: the kubelet's SIGTERM makes the trainer save a
    checkpoint and exit 3, which the Job's pod failure policy ignores (backoffLimit 0: a counted
    failure would fail the job); the replacement pod resumes from that checkpoint and ends at the
    planned step with the adapter on the volume."""
    ns = e2e.ns
    seed_volumes(ns)
    training = {**TINY_QLORA, "num_input_records_to_sample": 480}
    job = tiny_job("tiny", training)
    job["spec"]["backoffLimit"] = 0
    assert ns.apply(job).returncode == 0

    def mid_run() -> dict[str, str] | None:
        row = get_wide(ns, "tiny")
        progress = row.get("PROGRESS", "")
        assert row.get("PHASE") not in ("Failed", "Succeeded"), f"{row}\n{e2e.logs()}"
        if row.get("PHASE") == "Running" and progress.isdigit() and 8 <= int(progress) < 80:
            return row if row.get("LOSS") not in (None, "", "<none>") else None
        return None

    row = wait_for(mid_run, timeout=600, interval=0.5, what="progress and loss in kubectl get ftj",
                   describe=e2e.logs)  # fmt: skip
    assert row["SCHEME"] == "bnb-4bit" and row["GPU-ARCH"] == "Ampere" and row["NODE"] == NODE
    (first,) = [p for p in ns.pods("tiny") if p.status.phase == "Running"]
    assert first.status.container_statuses[0].container_id.startswith("containerd://")
    logs = ns.cluster.kubectl("logs", "-n", ns.name, first.metadata.name).stdout
    assert "finetune_trainer.training: step" in logs, logs[-2000:]

    deleted = ns.cluster.kubectl("delete", "pod", first.metadata.name, "-n", ns.name)
    assert deleted.returncode == 0, deleted.stderr

    def interrupted() -> str | None:
        message = str(ns.ftj("tiny").get("status", {}).get("message", ""))
        return message if "stopped on SIGTERM" in message else None

    seen = wait_for(interrupted, timeout=120, interval=0.2, what="the Interrupted status",
                    describe=e2e.logs)  # fmt: skip
    assert "without using a retry" in seen
    wait_for(
        lambda: ns.ftj("tiny").get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=600,
        interval=1,
        what="the run to end",
        describe=e2e.logs,
    )
    status = ns.ftj("tiny")["status"]
    assert status["phase"] == "Succeeded", f"{status}\n{e2e.logs()}"
    (job_object,) = ns.jobs()
    assert not job_object.status.failed, "the deletion used up a retry"
    (last,) = [p for p in ns.pods("tiny") if p.status.phase == "Succeeded"]
    assert last.metadata.uid != first.metadata.uid

    adapter = ns.volumes["out"] / "adapters" / "tiny"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (adapter / "adapter_model.safetensors").stat().st_uid == 65532  # the container's user
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    summary = json.loads((adapter / "training_summary.json").read_text())
    result = status["result"]
    assert result["adapter"] == "pvc://out/adapters/tiny"
    assert result["steps"] == 120 == summary["steps"]  # ceil(480 / (2 x 2))
    assert result["recordsSeen"] == 480
    assert result["finalLoss"] == pytest.approx(summary["final_loss"])
    assert 8 <= result["resumedFromStep"] < 120
    assert summary["resumed_from"] == f"checkpoint-{result['resumedFromStep']}"
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 120 and progress["percent"] == 100
    assert progress["evalLoss"] > 0
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True"
    assert status["placement"]["node"] == NODE


def test_gpu_only_scheme_on_cpu_fails_with_the_trainers_line(e2e: OnNode) -> None:
    """fp8 is placed on the H100's labels; the trainer finds no GPU in the container and says so
    in its termination message, which the operator turns into Failed/InvalidInput."""
    ns = e2e.ns
    seed_volumes(ns)
    training = {
        "pretrained_model": "tiny-llama",
        "quantize_model": True,
        "quantization_scheme": "fp8",
        "peft_implementation": "lora",
    }
    assert ns.apply(tiny_job("fp8", training)).returncode == 0
    wait_for(
        lambda: ns.ftj("fp8").get("status", {}).get("phase") == "Failed",
        timeout=300,
        interval=1,
        what="Failed",
        describe=e2e.logs,
    )
    failed = next(c for c in ns.ftj("fp8")["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidInput"
    expected = (
        "quantization scheme fp8 needs a CUDA GPU with compute capability ≥ 9.0 (Hopper or newer); "
        "no GPU is available"
    )
    assert failed["message"] == expected
    (pod,) = ns.pods("fp8")  # not retried: it cannot succeed
    terminated = pod.status.container_statuses[0].state.terminated
    # The operator read it from the container's termination message (the trainer's JSON outcome).
    outcome = json.loads(terminated.message)
    assert terminated.exit_code == 2
    assert (outcome["outcome"], outcome["reason"], outcome["message"]) == (
        "Failed", "InvalidInput", expected,
    )  # fmt: skip


def test_trainer_token_can_patch_only_its_own_status(e2e: OnNode) -> None:
    """The namespace's trainer account, with its token bound to a job's training pod, may patch
    that FineTuneJob's status.progress and nothing else. (nvfp4 needs a Blackwell, which this node
    is not: the jobs stay unscheduled, their pods exist.)"""
    ns = e2e.ns
    quiet = {
        "pretrained_model": "tiny-llama",
        "quantize_model": True,
        "quantization_scheme": "nvfp4",
        "peft_implementation": "lora",
    }
    for name in ("mine", "other"):
        assert ns.apply(tiny_job(name, quiet)).returncode == 0
    pods = wait_for(
        lambda: (
            ns.cluster.core.list_namespaced_pod(ns.name, label_selector="job-name=mine-train").items
        ),
        what="the training pod of mine",
    )
    token = service_account_token(ns.cluster, ns.name, ACCOUNT, pods[0])
    unbound = service_account_token(ns.cluster, ns.name, ACCOUNT)

    def can(*args: str) -> bool:
        result = subprocess.run(
            ["kubectl", "--token", token, "--kubeconfig", "/dev/null", "--server", _server(ns.cluster), "--insecure-skip-tls-verify", *args],
            capture_output=True, text=True, env=ns.cluster.env, check=False,
        )  # fmt: skip
        return result.returncode == 0

    assert can_via_api(ns, token, "mine")
    assert not can_via_api(ns, token, "other")
    assert not can_via_api(ns, unbound, "mine")
    assert not can_via_api(ns, token, "mine", '{"status": {"phase": "Succeeded"}}')
    assert not can("get", "secrets", "-n", ns.name)
    assert not can("delete", "ftj", "mine", "-n", ns.name)


def _server(cluster: Cluster) -> str:
    return str(json.loads((cluster.root / "endpoints.json").read_text())["server"])


def can_via_api(
    ns: Namespace, token: str, name: str, body: str = '{"status": {"progress": {"step": 1}}}'
) -> bool:
    """PATCH .../finetunejobs/NAME/status with the token, as the trainer does."""
    url = f"{_server(ns.cluster)}/apis/finetune.dev/v1alpha1/namespaces/{ns.name}/finetunejobs/{name}/status"
    request = urllib.request.Request(
        url,
        data=body.encode(),
        method="PATCH",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
        },
    )
    context = ssl.create_default_context(cafile=str(ns.cluster.root / "pki" / "ca.crt"))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        if exc.code != 403:  # anything but "forbidden" is a broken test, not a refusal
            raise
        return False
