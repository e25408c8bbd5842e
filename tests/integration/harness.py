"""The integration tier's harness: a real local control plane, simulated GPU nodes, the operator
as a separate process, and a fresh namespace per test with bound PersistentVolumeClaims."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from gpusim import GPU_TYPES, FakeKubelet, bind_hostpath_claim, create_gpu_node
from localcluster import LocalCluster, stop_process

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetunejobs.finetune.dev.yaml"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60,
    interval: float = 0.3,
    what: str = "",
    describe: Callable[[], Any] | None = None,
) -> Any:
    """Poll until predicate() is truthy; return its value or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    context = describe() if describe is not None else last
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what or predicate}; last: {context!r}"
    )


@dataclass
class Cluster:
    root: Path
    kubeconfig: Path
    api: client.ApiClient
    env: dict[str, str] = field(default_factory=dict)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
            timeout=180,  # a hung request fails the test instead of stalling the run
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result


def service_account_token(
    cluster: Cluster, namespace: str, name: str, pod: client.V1Pod | None = None
) -> str:
    """A fresh token of the ServiceAccount, through the TokenRequest API (`kubectl create token`),
    once the ServiceAccount exists; bound to `pod`, as the kubelet's token of a pod is."""
    wait_for(
        lambda: (
            cluster.core.list_namespaced_service_account(
                namespace, field_selector=f"metadata.name={name}"
            ).items
        ),
        what=f"ServiceAccount {namespace}/{name}",
    )
    bound = []
    if pod is not None:
        bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod.metadata.name]
        bound += ["--bound-object-uid", pod.metadata.uid]
    return cluster.kubectl("create", "token", name, "-n", namespace, *bound).stdout.strip()


def _kubectl_binary() -> str:
    tools = REPO / ".tools" / "bin" / "kubectl"
    return str(tools) if tools.exists() else (shutil.which("kubectl") or "kubectl")


@contextlib.contextmanager
def running_cluster(root: Path, node_address: str | None = None) -> Iterator[Cluster]:
    """A local control plane with the CRD installed, stopped on exit (`node_address`: ready for
    real kubelets, see hack/localcluster.py)."""
    local = LocalCluster(root, node_address=node_address)
    try:
        local.start()
        env = dict(os.environ, KUBECONFIG=str(local.kubeconfig))
        env["PATH"] = f"{Path(_kubectl_binary()).parent}:{env.get('PATH', '')}"
        api = config.new_client_from_config(str(local.kubeconfig))
        c = Cluster(root=root, kubeconfig=local.kubeconfig, api=api, env=env)
        c.kubectl("apply", "-f", str(CRD))
        local.wait_crd_established("finetunejobs.finetune.dev")
        yield c
    finally:
        local.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="session")
def gpu_nodes(cluster: Cluster) -> dict[str, str]:
    """One single-GPU node of each type: t4 7.5, a100 8.0, a10 8.6, l40s 8.9, h100 9.0, b200 10.0."""
    names = {}
    for key, gpu in GPU_TYPES.items():
        name = f"gpu-{key}"
        create_gpu_node(cluster.core, name, gpu, gpus=1)
        names[key] = name
    return names


@pytest.fixture(scope="session")
def kubelet(cluster: Cluster, gpu_nodes: dict[str, str]) -> Iterator[FakeKubelet]:
    # It reports pods' states; no test here runs the trainer (tests/e2e runs the trainer image on
    # a real node).
    with FakeKubelet(cluster.api, auto_start=True) as fake:
        yield fake


class Operator:
    """The operator as its own process, like a Deployment's container."""

    def __init__(self, cluster: Cluster, log_path: Path, *args: str) -> None:
        self.cluster = cluster
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator.main", *self.args],
            env=self.cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The shared operator, with default settings, watching the namespaces tests make (t-*)."""
    op = Operator(
        cluster, tmp_path_factory.mktemp("operator") / "operator.log", "--namespace", "t-*"
    ).start()
    try:
        yield op
    finally:
        op.stop()


@dataclass
class Namespace:
    name: str
    cluster: Cluster
    volumes: dict[str, Path]

    def apply(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(
            "apply", "-n", self.name, "-f", "-", input=yaml.safe_dump(manifest), check=False
        )

    def ftj(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.cluster.custom.get_namespaced_custom_object(
            "finetune.dev", "v1alpha1", self.name, "finetunejobs", name
        )
        return obj

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for cond in self.ftj(name).get("status", {}).get("conditions", []):
            if cond["type"] == type_:
                return dict(cond)
        return None

    def pods(self, ftj_name: str) -> list[Any]:
        uid = self.ftj(ftj_name)["metadata"]["uid"]
        return list(
            self.cluster.core.list_namespaced_pod(
                self.name, label_selector=f"finetune.dev/job-uid={uid}"
            ).items
        )

    def jobs(self) -> list[Any]:
        return list(self.cluster.batch.list_namespaced_job(self.name).items)


# Pod Security admission enforces the restricted profile in every namespace the tests use: a pod
# the operator or the chart creates that breaks it is refused by the API server (FailedCreate).
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


def create_restricted_namespace(cluster: Cluster, name: str) -> None:
    meta = client.V1ObjectMeta(name=name, labels=RESTRICTED)
    cluster.core.create_namespace(client.V1Namespace(metadata=meta))


def make_namespace(cluster: Cluster, tmp_path: Path, prefix: str = "t") -> Namespace:
    """A namespace with claims data, out and models bound to host directories."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_restricted_namespace(cluster, name)
    volumes = {claim: tmp_path / "volumes" / claim for claim in ("data", "out", "models")}
    for claim, path in volumes.items():
        bind_hostpath_claim(cluster.core, name, claim, path)
    for claim in volumes:
        wait_for(
            lambda c=claim: (
                cluster.core.read_namespaced_persistent_volume_claim(c, name).status.phase
                == "Bound"
            ),
            what=f"claim {claim} bound",
        )
    return Namespace(name=name, cluster=cluster, volumes=volumes)


def remove_namespace(ns: Namespace) -> None:
    """Delete the namespace and wait until its pods are gone (they hold simulated GPUs)."""
    cluster = ns.cluster
    cluster.kubectl(
        "delete",
        "finetunejobs",
        "--all",
        "-n",
        ns.name,
        "--wait=true",
        "--timeout=60s",
        check=False,
    )
    cluster.core.delete_namespace(ns.name)

    def pods_left() -> list[str]:
        pods = cluster.core.list_namespaced_pod(ns.name).items
        return [
            f"{p.metadata.name} {p.status.phase} node={p.spec.node_name} deleting={p.metadata.deletion_timestamp is not None}"
            for p in pods
        ]

    wait_for(lambda: not pods_left(), what=f"pods of {ns.name} gone", describe=pods_left)
    for claim in ns.volumes:
        cluster.core.delete_persistent_volume(f"{ns.name}-{claim}")


@pytest.fixture
def namespace(cluster: Cluster, operator: Operator, tmp_path: Path) -> Iterator[Namespace]:
    """A fresh namespace the shared operator watches."""
    ns = make_namespace(cluster, tmp_path)
    try:
        yield ns
    finally:
        remove_namespace(ns)


def ftj_manifest(name: str, training: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"claimName": "data", "path": "train.jsonl"},
        "output": {"claimName": "out", "path": name},
        "training": training or {},
    }
    body.update(spec)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


def scheme_training(scheme: str | None) -> dict[str, Any]:
    if scheme is None:
        return {"quantize_model": False, "peft_implementation": "lora"}
    return {"quantize_model": True, "quantization_scheme": scheme}
