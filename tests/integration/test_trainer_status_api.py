"""The trainer's status reports against the real API server: over TLS, with each kind of
credential the trainer reads (finetune_trainer.kubeapi), and as the identity the operator gives
it: the namespace's trainer account, kept by the admission policy to its own job's progress.
(The requests as sent are in tests/unit/test_trainer_kubeapi.py; from inside a pod on a real node:
tests/e2e/test_training_on_node.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_api.resource import Progress
from finetune_operator import builders, trainer_identity
from finetune_operator.kube import Kube
from finetune_trainer import kubeapi, report
from integration.harness import Cluster, ftj_manifest, wait_for
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


def service_account_dir(
    cluster: Cluster, tmp_path: Path, namespace: str, name: str, pod: dict[str, Any] | None = None
) -> Path:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount: a token of the
    account (the TokenRequest API; bound to `pod`, as the kubelet's is) and the cluster's CA."""
    folder = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    bound = []
    if pod is not None:
        meta = pod["metadata"]
        bound = ["--bound-object-kind", "Pod", "--bound-object-name", meta["name"]]
        bound += ["--bound-object-uid", meta["uid"]]
    token = cluster.kubectl("create", "token", name, "-n", namespace, *bound).stdout.strip()
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_bytes((cluster.root / "pki" / "ca.crt").read_bytes())
    return folder


def make_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """A pod object of the trainer's account (no node runs it: only its token is used)."""
    body = {
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": trainer_identity.ACCOUNT,
            "containers": [{"name": "trainer", "image": "trainer:test"}],
        },
    }
    pod: dict[str, Any] = client.ApiClient().sanitize_for_serialization(
        cluster.core.create_namespaced_pod(namespace, body)
    )
    return pod


@pytest.fixture
def trainer_identity_in(cluster: Cluster, ftj: dict[str, Any]) -> str:
    """The namespace's trainer identity and the admission policy, as the operator makes them."""
    namespace: str = ftj["metadata"]["namespace"]
    kube = Kube(cluster.api)
    # Operators starting together (replicas, or two installs) apply it at once, and again over
    # the status the API server wrote: each apply succeeds.
    with ThreadPoolExecutor(4) as pool:
        applies = [
            pool.submit(
                kube.keep_admission_policy,
                trainer_identity.build_policy(),
                trainer_identity.build_policy_binding(),
            )
            for _ in range(4)
        ]
        for done in applies:
            done.result()
    for part in trainer_identity.build_identity(namespace):
        assert kube.create_if_missing(part)
    cluster.core.create_namespaced_service_account(namespace, {"metadata": {"name": "no-role"}})
    # The policy takes effect once the API server has loaded it: wait until it refuses.
    pod = make_pod(cluster, namespace, "not-a-training-pod")
    tokens = cluster.root / "tokens"
    tokens.mkdir(exist_ok=True)
    folder = service_account_dir(cluster, tokens, namespace, trainer_identity.ACCOUNT, pod)
    endpoint = in_pod(cluster, folder)
    wait_for(lambda: patch_refused(endpoint, ftj) is not None, what="the policy in force")
    return namespace


def in_pod(cluster: Cluster, folder: Path) -> kubeapi.Endpoint:
    host, _, port = LocalCluster(cluster.root).server.removeprefix("https://").rpartition(":")
    return kubeapi.in_cluster(host, port, folder)


def patch_refused(
    endpoint: kubeapi.Endpoint, ftj: dict[str, Any], status: dict[str, Any] | None = None
) -> str | None:
    """The API server's refusal of a status patch, or None when it took it."""
    meta = ftj["metadata"]
    path = f"/apis/finetune.dev/v1alpha1/namespaces/{meta['namespace']}/finetunejobs/{meta['name']}/status"
    body = {"status": status or {"progress": {"step": 1, "totalSteps": 8}}}
    try:
        endpoint.merge_patch(path, body, timeout=10)
    except kubeapi.ApiError as exc:
        return str(exc)
    return None


def test_in_a_pod_the_trainer_patches_only_its_own_progress(
    cluster: Cluster,
    ftj: dict[str, Any],
    trainer_identity_in: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace, name = trainer_identity_in, ftj["metadata"]["name"]
    host, _, port = LocalCluster(cluster.root).server.removeprefix("https://").rpartition(":")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    monkeypatch.setenv("FINETUNE_REPORT_STATUS", "true")
    monkeypatch.setenv("FINETUNE_JOB_NAME", name)
    monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", namespace)
    account = trainer_identity.ACCOUNT

    own = make_pod(cluster, namespace, f"{builders.job_name(name)}-x7k2p")
    monkeypatch.setattr(
        kubeapi,
        "SERVICE_ACCOUNT_DIR",
        service_account_dir(cluster, tmp_path, namespace, account, own),
    )
    granted = report.StatusReporter.from_env()
    assert granted is not None
    assert granted.report(Progress(step=8, total_steps=8, percent=100), force=True)
    assert granted.flush() and granted.patches_sent == 1
    assert progress_of(cluster, ftj) == {"step": 8, "totalSteps": 8, "percent": 100}
    # Its own job, but a field the operator owns: refused.
    endpoint = in_pod(cluster, service_account_dir(cluster, tmp_path, namespace, account, own))
    refusal = patch_refused(endpoint, ftj, {"phase": "Succeeded"})
    assert refusal is not None and "the trainer may change only status.progress" in refusal

    # Another job's training pod, a pod that is no training pod, a token bound to no pod, and an
    # account the Role does not name: all refused, the progress left as it was.
    for pod_name, bound, expected in (
        (f"{name}x-train-abcde", True, f"pod {name}x-train-abcde is not a training pod of {name}"),
        (f"{builders.job_name(name)}-ab", True, "is not a training pod of"),
        (None, False, "its token is not bound to a pod"),
    ):
        pod = make_pod(cluster, namespace, pod_name) if pod_name else None
        folder = service_account_dir(cluster, tmp_path, namespace, account, pod if bound else None)
        refusal = patch_refused(in_pod(cluster, folder), ftj)
        assert refusal is not None and "403" in refusal and expected in refusal, refusal
    folder = service_account_dir(cluster, tmp_path, namespace, "no-role")
    refusal = patch_refused(in_pod(cluster, folder), ftj)
    assert refusal is not None and "cannot patch resource" in refusal
    assert progress_of(cluster, ftj) == {"step": 8, "totalSteps": 8, "percent": 100}


def test_a_long_named_job_and_an_indexed_pod(
    cluster: Cluster, ftj: dict[str, Any], trainer_identity_in: str, tmp_path: Path
) -> None:
    """A name too long for <name>-train has a hash in its Job's name: the policy reads the Job's
    name from the status the operator wrote. Pods of an Indexed Job carry their index."""
    namespace = trainer_identity_in
    long_name = "a-fine-tune-job-with-a-name-longer-than-forty-six-characters"
    body = cluster.custom.create_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", ftj_manifest(long_name)
    )
    job = builders.job_name(long_name)
    assert job != f"{long_name}-train"
    account = trainer_identity.ACCOUNT
    pod = make_pod(cluster, namespace, f"{job}-0-q2w3e")
    endpoint = in_pod(cluster, service_account_dir(cluster, tmp_path, namespace, account, pod))
    assert "is not a training pod of" in (patch_refused(endpoint, body) or "")  # no jobName yet
    cluster.custom.patch_namespaced_custom_object_status(
        "finetune.dev",
        "v1alpha1",
        namespace,
        "finetunejobs",
        long_name,
        {"status": {"jobName": job}},
    )
    assert patch_refused(endpoint, body) is None
    short = make_pod(cluster, namespace, f"{builders.job_name(ftj['metadata']['name'])}-1-q2w3e")
    endpoint = in_pod(cluster, service_account_dir(cluster, tmp_path, namespace, account, short))
    assert patch_refused(endpoint, ftj) is None
