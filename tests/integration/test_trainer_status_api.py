"""The trainer's status reports against the real API server: over TLS, with each kind of
credential the trainer reads (finetune_trainer.kubeapi), and with the Role the operator grants it.
(The requests as sent are in tests/unit/test_trainer_kubeapi.py; from inside a pod on a real node:
tests/e2e/test_training_on_node.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_api.resource import Progress
from finetune_operator import builders
from finetune_trainer import kubeapi, report
from integration.harness import Cluster, ftj_manifest
from localcluster import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def ftj(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """A FineTuneJob in a namespace of its own (no operator watches it)."""
    namespace = f"ts-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    body = cluster.custom.create_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", ftj_manifest("report")
    )
    try:
        yield body
    finally:
        cluster.core.delete_namespace(namespace)


def progress_of(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any] | None:
    got = cluster.custom.get_namespaced_custom_object_status(
        "finetune.dev", "v1alpha1", body["metadata"]["namespace"], "finetunejobs", "report"
    )
    found: dict[str, Any] | None = (got.get("status") or {}).get("progress")
    return found


def reporter(endpoint: kubeapi.Endpoint, body: dict[str, Any]) -> report.StatusReporter:
    meta = body["metadata"]
    return report.StatusReporter(meta["name"], meta["namespace"], endpoint, report.RateLimiter(0))


def test_token_and_ca_data_from_a_kubeconfig(cluster: Cluster, ftj: dict[str, Any]) -> None:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"].startswith("https://")
    assert reporter(kubeapi.from_kubeconfig(cluster.kubeconfig), ftj).send(
        Progress(step=3, total_steps=8, loss=2.5)
    )
    assert progress_of(cluster, ftj) == {"step": 3, "totalSteps": 8, "loss": 2.5}


def test_client_certificate_files_from_a_kubeconfig(cluster: Cluster, ftj: dict[str, Any]) -> None:
    path = LocalCluster(cluster.root).client_kubeconfig(
        f"trainer-{uuid.uuid4().hex[:6]}", "trainer-test", groups=("system:masters",)
    )
    assert reporter(kubeapi.from_kubeconfig(path), ftj).send(Progress(step=5, total_steps=8))
    assert progress_of(cluster, ftj) == {"step": 5, "totalSteps": 8}


def service_account_dir(cluster: Cluster, tmp_path: Path, namespace: str, name: str) -> Path:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount: a token of the
    account (the TokenRequest API) and the cluster's CA."""
    folder = tmp_path / name
    folder.mkdir()
    token = cluster.kubectl("create", "token", name, "-n", namespace).stdout.strip()
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_bytes((cluster.root / "pki" / "ca.crt").read_bytes())
    return folder


def test_in_a_pod_with_the_role_the_operator_grants(
    cluster: Cluster,
    ftj: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    meta = ftj["metadata"]
    job = builders.JobIdentity(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    api = client.ApiClient()
    serialize = api.sanitize_for_serialization
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    cluster.core.create_namespaced_service_account(
        job.namespace, serialize(builders.build_service_account(job))
    )
    cluster.core.create_namespaced_service_account(job.namespace, {"metadata": {"name": "no-role"}})
    rbac.create_namespaced_role(job.namespace, serialize(builders.build_role(job)))
    rbac.create_namespaced_role_binding(job.namespace, serialize(builders.build_role_binding(job)))
    host, _, port = LocalCluster(cluster.root).server.removeprefix("https://").rpartition(":")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    monkeypatch.setenv("FINETUNE_REPORT_STATUS", "true")
    monkeypatch.setenv("FINETUNE_JOB_NAME", job.name)
    monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", job.namespace)

    account = builders.trainer_account_name(job.name)
    monkeypatch.setattr(
        kubeapi,
        "SERVICE_ACCOUNT_DIR",
        service_account_dir(cluster, tmp_path, job.namespace, account),
    )
    granted = report.StatusReporter.from_env()
    assert granted is not None
    assert granted.report(Progress(step=8, total_steps=8, percent=100), force=True)
    assert granted.flush() and granted.patches_sent == 1
    assert progress_of(cluster, ftj) == {"step": 8, "totalSteps": 8, "percent": 100}

    monkeypatch.setattr(
        kubeapi,
        "SERVICE_ACCOUNT_DIR",
        service_account_dir(cluster, tmp_path, job.namespace, "no-role"),
    )
    refused = report.StatusReporter.from_env()
    assert refused is not None
    assert not refused.send(Progress(step=1, total_steps=8))
    assert "403 Forbidden: " in caplog.text and "cannot patch resource" in caplog.text
    assert progress_of(cluster, ftj) == {"step": 8, "totalSteps": 8, "percent": 100}
