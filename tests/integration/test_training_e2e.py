"""End to end: kubectl apply -> operator -> kube-scheduler -> the trainer really trains.

A kubelet stand-in runs the training pod's container command as a local process with the pod's
env and volumes (hack/podrunner.py: a private mount namespace, read-only root filesystem), so the
trainer reads the operator's ConfigMap, the PVCs and the service-account token as in a pod, and
reports progress with its own per-job RBAC.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpusim import FakeKubelet
from integration.harness import (
    Cluster,
    Namespace,
    Operator,
    make_namespace,
    remove_namespace,
    service_account_token,
    wait_for,
)
from podrunner import LocalRuntime
from tinymodel import TINY_QLORA, build_tiny_model, tiny_finetunejob, write_corpus

pytestmark = [pytest.mark.integration, pytest.mark.training]

IMAGE = "local/finetune-trainer:dev"


@dataclass
class E2E:
    ns: Namespace
    operator: Operator
    runtime_dir: Path


@contextmanager
def trainer_cluster(
    cluster: Cluster, tmp_path: Path
) -> Iterator[tuple[Namespace, Operator, LocalRuntime, Path]]:
    """The operator, a namespace and the stand-in kubelet running the real trainer's pods:
    (namespace, operator, runtime, the runtime's log directory)."""
    op = Operator(
        cluster, tmp_path / "operator.log",
        "--namespace", "e-*", "--trainer-image", IMAGE, "--progress-interval", "1",
    ).start()  # fmt: skip
    ns = make_namespace(cluster, tmp_path, prefix="e")
    runtime_dir = tmp_path / "runtime"
    runtime = LocalRuntime.for_trainer(cluster.core, _server(cluster), IMAGE, runtime_dir)
    try:
        with FakeKubelet(cluster.api, runner=runtime, namespaces=lambda n: n.startswith("e-")):
            try:
                yield ns, op, runtime, runtime_dir
            finally:
                remove_namespace(ns)  # while the kubelet still completes pod deletions
    finally:
        op.stop()


@pytest.fixture
def e2e(cluster: Cluster, gpu_nodes: dict[str, str], tmp_path: Path) -> Iterator[E2E]:
    with trainer_cluster(cluster, tmp_path) as (ns, op, _, runtime_dir):
        yield E2E(ns, op, runtime_dir)


def tiny_job(name: str, training: dict[str, Any]) -> dict[str, Any]:
    job = tiny_finetunejob(name, training, "corpus/train.jsonl", ("out", f"adapters/{name}"))
    job["spec"]["resources"] = {"cpu": "2", "memory": "4Gi"}
    return job


def seed_volumes(ns: Namespace) -> None:
    build_tiny_model(ns.volumes["models"] / "tiny-llama")
    write_corpus(ns.volumes["data"] / "corpus" / "train.jsonl", repeat=8)


def get_wide(ns: Namespace, name: str) -> dict[str, str]:
    out = ns.cluster.kubectl("get", "ftj", name, "-n", ns.name, "-o", "wide").stdout.splitlines()
    header, row = out[0].split(), out[1].split(maxsplit=len(out[0].split()) - 1)
    return dict(zip(header, row, strict=False))


def test_apply_train_and_watch_progress(e2e: E2E) -> None:
    ns = e2e.ns
    seed_volumes(ns)
    training = {**TINY_QLORA, "num_input_records_to_sample": 480}
    assert ns.apply(tiny_job("tiny", training)).returncode == 0

    # While it trains, `kubectl get ftj` shows the node, the progress and the loss.
    def mid_run() -> dict[str, str] | None:
        row = get_wide(ns, "tiny")
        progress = row.get("PROGRESS", "<none>")
        if (
            row.get("PHASE") == "Running"
            and progress.isdigit()
            and 0 < int(progress) < 100
            and row.get("LOSS") not in (None, "<none>")
        ):
            return row
        return None

    row = wait_for(mid_run, timeout=300, interval=0.5, what="progress and loss in kubectl get ftj")
    assert row["SCHEME"] == "bnb-4bit" and row["GPU-ARCH"] == "Ampere"
    assert row["NODE"] in {"gpu-a100", "gpu-a10", "gpu-l40s", "gpu-h100", "gpu-b200"}

    wait_for(
        lambda: ns.ftj("tiny").get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=600,
        interval=1,
        what="the run to end",
    )
    status = ns.ftj("tiny")["status"]
    log = next(e2e.runtime_dir.glob("*.log")).read_text()
    assert status["phase"] == "Succeeded", f"{status}\n--- trainer log ---\n{log[-3000:]}"

    adapter = ns.volumes["out"] / "adapters" / "tiny"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    summary = json.loads((adapter / "training_summary.json").read_text())
    result = status["result"]
    assert result["adapter"] == "pvc://out/adapters/tiny"
    assert result["steps"] == 120 == summary["steps"]  # ceil(480 / (2 x 2))
    assert result["recordsSeen"] == 480
    assert result["finalLoss"] == pytest.approx(summary["final_loss"])
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 120 and progress["percent"] == 100
    assert progress["evalLoss"] > 0
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True"


def test_deleted_pod_checkpoints_and_the_replacement_resumes_without_a_retry(e2e: E2E) -> None:
    """`kubectl delete pod` mid-run: the kubelet's SIGTERM makes the trainer save a checkpoint and
    exit 3, which the Job's pod failure policy ignores (backoffLimit 0: a counted failure would
    fail the job); the replacement pod resumes from that checkpoint and ends at the planned step."""
    ns = e2e.ns
    seed_volumes(ns)
    training = {**TINY_QLORA, "num_input_records_to_sample": 480}
    job = tiny_job("stopped", training)
    job["spec"]["backoffLimit"] = 0
    assert ns.apply(job).returncode == 0

    def training_pod() -> Any:
        step = ns.ftj("stopped").get("status", {}).get("progress", {}).get("step") or 0
        running = [p for p in ns.pods("stopped") if p.status.phase == "Running"]
        return running[0] if running and 10 <= step < 100 else None

    first = wait_for(training_pod, timeout=300, interval=0.5, what="the trainer past step 10")
    deleted = ns.cluster.kubectl("delete", "pod", first.metadata.name, "-n", ns.name)
    assert deleted.returncode == 0, deleted.stderr

    def interrupted() -> str | None:
        message = str(ns.ftj("stopped").get("status", {}).get("message", ""))
        return message if "stopped on SIGTERM" in message else None

    seen = wait_for(interrupted, timeout=120, interval=0.2, what="the Interrupted status")
    assert "without using a retry" in seen
    wait_for(
        lambda: ns.ftj("stopped").get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=600,
        interval=1,
        what="the run to end",
    )
    status = ns.ftj("stopped")["status"]
    assert status["phase"] == "Succeeded", status
    (job_object,) = ns.jobs()
    assert not job_object.status.failed, "the deletion used up a retry"
    logs = "".join(path.read_text()[-2000:] for path in sorted(e2e.runtime_dir.glob("*.log")))
    assert "resumedFromStep" in status["result"], f"{status}\n--- trainer logs ---\n{logs}"
    resumed = status["result"]["resumedFromStep"]
    assert 10 <= resumed < 120 and status["result"]["steps"] == 120


def test_gpu_only_scheme_on_cpu_fails_with_the_trainers_line(e2e: E2E) -> None:
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
    )
    failed = next(c for c in ns.ftj("fp8")["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidInput"
    assert failed["message"] == (
        "quantization scheme fp8 needs a CUDA GPU with compute capability ≥ 9.0 (Hopper or newer); "
        "no GPU is available"
    )
    assert len(ns.pods("fp8")) == 1  # not retried: it cannot succeed


def test_trainer_token_can_patch_only_its_own_status(e2e: E2E) -> None:
    """The per-job ServiceAccount may patch its FineTuneJob's status and nothing else."""
    ns = e2e.ns
    seed_volumes(ns)
    quiet = {
        "pretrained_model": "tiny-llama",
        "quantize_model": True,
        "quantization_scheme": "nvfp4",
        "peft_implementation": "lora",
    }
    for name in ("mine", "other"):
        assert ns.apply(tiny_job(name, quiet)).returncode == 0
    token = service_account_token(ns.cluster, ns.name, "mine-trainer")

    def can(*args: str) -> bool:
        result = subprocess.run(
            ["kubectl", "--token", token, "--kubeconfig", "/dev/null", "--server", _server(ns.cluster), "--insecure-skip-tls-verify", *args],
            capture_output=True, text=True, env=ns.cluster.env, check=False,
        )  # fmt: skip
        return result.returncode == 0

    assert can_via_api(ns, token, "mine")
    assert not can_via_api(ns, token, "other")
    assert not can("get", "secrets", "-n", ns.name)
    assert not can("delete", "ftj", "mine", "-n", ns.name)


def _server(cluster: Cluster) -> str:
    return str(json.loads((cluster.root / "endpoints.json").read_text())["server"])


def can_via_api(ns: Namespace, token: str, name: str) -> bool:
    """PATCH .../finetunejobs/NAME/status with the token, as the trainer does."""
    url = f"{_server(ns.cluster)}/apis/finetune.dev/v1alpha1/namespaces/{ns.name}/finetunejobs/{name}/status"
    request = urllib.request.Request(
        url,
        data=b'{"status": {"progress": {"step": 1}}}',
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
