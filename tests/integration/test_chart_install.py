"""The rendered Helm chart on a control plane of its own, and the operator running with the chart's
ServiceAccount token (not admin): its RBAC must be enough for a whole FineTuneJob, and no more."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from gpusim import GPU_TYPES, FakeKubelet, create_gpu_node, install_device_class, publish_gpus
from integration.harness import (
    Cluster,
    create_restricted_namespace,
    ftj_manifest,
    make_namespace,
    running_cluster,
    service_account_token,
    wait_for,
)
from localcluster import LocalCluster, free_port
from podsecurity import restricted_violations

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
SYSTEM = "finetune-system"


def helm() -> str:
    local = REPO / ".tools" / "bin" / "helm"
    return str(local) if local.exists() else "helm"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, FakeKubelet]]:
    """A control plane without the shared operator: the chart's operator watches every namespace."""
    with running_cluster(tmp_path_factory.mktemp("chart-cluster")) as cluster:
        for key in ("a100", "h100"):
            create_gpu_node(cluster.core, f"gpu-{key}", GPU_TYPES[key], gpus=1)
        # For gpuAllocation=dra: a node whose GPU only a ResourceSlice of the NVIDIA driver offers.
        install_device_class(cluster.api)
        create_gpu_node(cluster.core, "dra-h100", None)
        publish_gpus(cluster.api, "dra-h100", [GPU_TYPES["h100"]])
        with FakeKubelet(cluster.api, auto_start=True) as kubelet:
            yield cluster, kubelet


def rendered(release: str, namespace: str, *sets: str) -> list[dict[str, Any]]:
    args = [helm(), "template", release, str(CHART), "-n", namespace, "--include-crds"]
    for item in sets:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def service_account_kubeconfig(cluster: Cluster, name: str, system: str, path: Path) -> Path:
    """A kubeconfig that authenticates with the ServiceAccount's token."""

    token = service_account_token(cluster, system, name)
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    admin["users"] = [{"name": name, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = name
    path.write_text(json.dumps(admin))
    return path


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced", "dra"])
def test_chart_installs_and_its_rbac_runs_a_job_end_to_end(
    fresh: tuple[Cluster, FakeKubelet], tmp_path: Path, mode: str
) -> None:
    cluster, kubelet = fresh
    release, system = f"ftj-{mode}", f"{SYSTEM}-{mode}"
    ns = make_namespace(cluster, tmp_path, prefix="team")
    sets = {"namespaced": [f"watch.namespaces={{{ns.name}}}"], "dra": ["gpuAllocation=dra"]}
    docs = rendered(release, system, *sets.get(mode, []))
    create_restricted_namespace(cluster, system)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    LocalCluster(cluster.root).wait_crd_established("finetunejobs.finetune.dev")
    roles = [d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"]
    assert roles == ([ns.name] if mode == "namespaced" else [])

    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    sa_config = service_account_kubeconfig(
        cluster, pod["serviceAccountName"], system, tmp_path / "sa.kubeconfig"
    )

    # The Deployment's own arguments; only the listening addresses move to loopback.
    port = free_port()
    args = [a for a in pod["containers"][0]["args"] if not a.startswith("--liveness=")]
    args += ["--webhook-host=127.0.0.1", f"--webhook-port={port}"]
    env = dict(
        cluster.env, KUBECONFIG=str(sa_config), POD_ID=f"operator-{mode}", POD_NAMESPACE=system
    )
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        operator = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator.main", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        training = {"quantize_model": True, "quantization_scheme": "bnb-4bit"}
        assert ns.apply(ftj_manifest("llama", training)).returncode == 0

        def running() -> Any:
            pods = [p for p in ns.pods("llama") if p.status.phase == "Running"]
            return (
                pods[0]
                if pods and ns.ftj("llama").get("status", {}).get("phase") == "Running"
                else None
            )

        training_pod = wait_for(running, timeout=90, what="the job Running", describe=log.read_text)
        if mode == "dra":  # placed by the claim's allocation, which the operator read back
            placement = ns.ftj("llama")["status"]["placement"]
            assert training_pod.spec.node_name == "dra-h100"
            assert placement["gpuDevices"] == ["dra-h100/gpu-0"]
            assert placement["gpuProduct"] == GPU_TYPES["h100"].name
        job = cluster.batch.read_namespaced_job("llama-train", ns.name)
        assert (
            restricted_violations(
                client.ApiClient().sanitize_for_serialization(job.spec.template.spec)
            )
            == []
        )
        outcome = {"outcome": "Succeeded", "reason": "Completed", "result": {"steps": 5}}
        kubelet.finish(training_pod, 0, json.dumps(outcome))
        wait_for(
            lambda: ns.ftj("llama")["status"].get("phase") == "Succeeded",
            timeout=60,
            what="Succeeded",
            describe=log.read_text,
        )

        def reasons() -> set[str]:
            events = cluster.core.list_namespaced_event(
                ns.name, field_selector="involvedObject.name=llama"
            ).items
            return {e.reason for e in events}

        # Events are posted asynchronously: wait for them rather than sample once.
        wait_for(lambda: {"Running", "Completed"} <= reasons(), what="Running and Completed events")
        # The webhook is off by default (the CRD's CEL rules do its work): none was registered.
        admission = client.AdmissionregistrationV1Api(cluster.api)
        assert admission.list_validating_webhook_configuration().items == []
        assert "Forbidden" not in log.read_text(), log.read_text()
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        cluster.kubectl("delete", "ftj", "--all", "-n", ns.name, "--wait=true", "--timeout=60s")

    def can(*request: str) -> bool:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(sa_config), "auth", "can-i", *request],
            capture_output=True, text=True, env=cluster.env, check=False,
        )  # fmt: skip
        return result.stdout.strip() == "yes"

    assert can("create", "jobs.batch", "-n", ns.name)
    assert can("patch", "finetunejobs.finetune.dev/status", "-n", ns.name)
    for forbidden in (
        ("get", "secrets", "-n", ns.name),
        ("delete", "nodes"),
        ("create", "deployments.apps", "-n", ns.name),
        ("delete", "finetunejobs.finetune.dev", "-n", ns.name),
        ("update", "finetunejobs.finetune.dev", "-n", ns.name),
        ("create", "pods", "-n", ns.name),
        ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/someone-else"),
    ):
        assert not can(*forbidden), forbidden
    if mode == "namespaced":
        assert not can("create", "jobs.batch", "-n", "default")  # only the watched namespaces
    dra_rights = (
        ("create", "resourceclaimtemplates.resource.k8s.io", "-n", ns.name),
        ("get", "resourceclaims.resource.k8s.io", "-n", ns.name),
        ("list", "resourceslices.resource.k8s.io"),
    )
    for request in dra_rights:  # only what DRA mode uses, and only in DRA mode
        assert can(*request) == (mode == "dra"), request
    for forbidden in (
        ("create", "resourceclaims.resource.k8s.io", "-n", ns.name),
        ("patch", "resourceclaims.resource.k8s.io/status", "-n", ns.name),
        ("create", "resourceslices.resource.k8s.io"),
        ("create", "deviceclasses.resource.k8s.io"),
    ):
        assert not can(*forbidden), forbidden
    refused = subprocess.run(
        ["kubectl", "--kubeconfig", str(sa_config), "get", "secrets", "-n", ns.name],
        capture_output=True, text=True, env=cluster.env, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()
