"""What the tests that train on the real node share: an operator watching e-* namespaces that runs
the trainer image, a restricted namespace whose claims models, data and out are hostPath
PersistentVolumes the trainer (UID 65532) can read, and the training pods' logs read back through
the API server (`kubectl logs`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from e2e import wide_row
from integration.harness import Cluster, Namespace, Operator, make_namespace, remove_namespace
from tinymodel import build_tiny_model, tiny_finetunejob, write_corpus

NODE = "realnode-h100"  # the real node's name: an H100's labels, two GPUs


@dataclass
class OnNode:
    ns: Namespace
    operator: Operator

    def logs(self, tail: int = 40) -> str:
        """The last lines of every container log in the namespace, as `kubectl logs` shows them."""
        core = self.ns.cluster.core
        parts = []
        for pod in core.list_namespaced_pod(self.ns.name).items:
            try:
                text = core.read_namespaced_pod_log(
                    pod.metadata.name, self.ns.name, tail_lines=tail
                )
            except ApiException as exc:
                text = f"(no log: {exc.reason})"
            parts.append(f"--- {pod.metadata.name} ({pod.status.phase}) ---\n{text}")
        return "\n".join(parts) + f"\n--- operator ---\n{self.operator.log()[-2000:]}"


@contextmanager
def trainer_namespace(
    cluster: Cluster, image: str, volume_root: Path, log_dir: Path
) -> Iterator[OnNode]:
    """An operator of its own (namespaces e-*, the trainer image, progress every second) and a
    fresh namespace; the namespace goes first on exit, while the operator still finalizes."""
    op = Operator(
        cluster, log_dir / "operator.log",
        "--namespace", "e-*", "--trainer-image", image, "--progress-interval", "1",
    ).start()  # fmt: skip
    try:
        ns = make_namespace(cluster, volume_root, prefix="e")
        try:
            yield OnNode(ns, op)
        finally:
            remove_namespace(ns)
    finally:
        op.stop()


def seed_volumes(ns: Namespace) -> None:
    """The tiny model and the corpus on the claims. The trainer runs as UID 65532: what it reads
    must be readable by others (safetensors writes its files 0600), as on any shared volume."""
    build_tiny_model(ns.volumes["models"] / "tiny-llama")
    write_corpus(ns.volumes["data"] / "corpus" / "train.jsonl", repeat=8)
    for claim in ("models", "data"):
        subprocess.run(["chmod", "-R", "a+rX", str(ns.volumes[claim])], check=True)


def tiny_job(name: str, training: dict[str, Any], cpu: str = "1") -> dict[str, Any]:
    job = tiny_finetunejob(name, training, "corpus/train.jsonl", ("out", f"adapters/{name}"))
    job["spec"]["resources"] = {"cpu": cpu, "memory": "4Gi"}
    return job


def get_wide(ns: Namespace, name: str) -> dict[str, str]:
    return wide_row(ns.cluster.kubectl("get", "ftj", name, "-n", ns.name, "-o", "wide").stdout)
