"""`make e2e`: a user's first day, for real, on this machine.

Both images built here (hack/images.sh, buildah), a control plane and one real node (hack/realnode.py:
kubelet, containerd and runc, CNI, kube-proxy), then the user's path:

1. `helm install` of the chart with the locally built operator image; the operator runs as a pod
   with the chart's ServiceAccount in a namespace that enforces the `restricted` Pod Security
   profile.
2. `kubectl apply` of a FineTuneJob whose tiny model (built here) and data sit on
   PersistentVolumes; the trainer image trains in containerd, `kubectl get ftj` shows progress
   and loss, and `kubectl logs` shows the trainer's log.
3. The running training pod is deleted (graceful: SIGTERM); the trainer checkpoints, the
   replacement pod resumes and ends at the planned step count, and the Job has used no retry.
4. An fp8 job on this CPU-only node ends Failed/InvalidInput with the trainer's one line, read from
   the container's termination message.

Everything is torn down at the end (also on failure). The last line of stdout is one JSON object:
{"phase", "node", "containerID", "images", "steps", "resumed", "seconds"}; any failed check exits 1
with its reason on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config
from realnode import RealNode, default_address

from gpusim import bind_hostpath_claim
from localcluster import LocalCluster
from tinymodel import TINY_QLORA, build_tiny_model, tiny_finetunejob, write_corpus

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "finetune-operator"
RELEASE = "finetune-operator"
SYSTEM = "finetune-system"
TEAM = "team-a"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
STEPS = 300  # 1,200 records, batch 2 x 2 accumulation: long enough to stop it halfway
T = TypeVar("T")


class ExpectationError(Exception):
    """One of the user's expectations did not hold."""


def log(message: str) -> None:
    print(f"e2e: {message}", file=sys.stderr, flush=True)


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise ExpectationError(f"timed out after {timeout:.0f} s waiting for {what}")


def build_images() -> dict[str, dict[str, Any]]:
    """Both images (built or reused from buildah's cache): {target: {ref, id, archive, size_mb}}."""
    result = subprocess.run(
        [str(REPO / "hack" / "images.sh")], stdout=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise ExpectationError(f"hack/images.sh failed with exit code {result.returncode}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


class User:
    """kubectl and helm with the cluster's admin kubeconfig, as a platform engineer runs them."""

    def __init__(self, kubeconfig: Path) -> None:
        tools = REPO / ".tools" / "bin"
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        self.env["PATH"] = f"{tools}:{self.env.get('PATH', '')}"
        self.api = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def run(self, *argv: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            argv,
            check=False,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=300,
        )
        if result.returncode != 0:
            raise ExpectationError(f"{' '.join(argv[:3])} failed: {result.stderr.strip()}")
        return result.stdout

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.run("kubectl", *args, stdin=stdin)

    def restricted_namespace(self, name: str) -> None:
        meta = client.V1ObjectMeta(name=name, labels=RESTRICTED)
        self.core.create_namespace(client.V1Namespace(metadata=meta))

    def ftj(self, name: str) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(
            "finetune.dev", "v1alpha1", TEAM, "finetunejobs", name
        )
        return dict(obj)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.ftj(name).get("status") or {})

    def selector(self, name: str) -> str:
        """The label the operator puts on a FineTuneJob's Job and pods."""
        return f"finetune.dev/job-uid={self.ftj(name)['metadata']['uid']}"

    def pods(self, name: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(TEAM, label_selector=self.selector(name)).items)


def install_chart(user: User, images: dict[str, dict[str, Any]], workdir: Path) -> Any:
    """helm install with the local images; returns the operator's Running pod."""
    user.restricted_namespace(SYSTEM)
    operator_repo, operator_tag = images["operator"]["ref"].rsplit(":", 1)
    trainer_repo, trainer_tag = images["trainer"]["ref"].rsplit(":", 1)
    values = {
        "image": {"repository": operator_repo, "tag": operator_tag},
        "trainer": {
            "image": {"repository": trainer_repo, "tag": trainer_tag},
            "progressInterval": 1,  # the tiny run takes a minute or two
        },
        # The only node is a GPU node, tainted as GPU nodes are.
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    values_file = workdir / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    user.run(
        "helm", "install", RELEASE, str(CHART), "-n", SYSTEM, "-f", str(values_file),
        "--wait", "--timeout", "5m",
    )  # fmt: skip
    pods = user.core.list_namespaced_pod(SYSTEM).items
    running = [p for p in pods if p.status.phase == "Running"]
    if len(running) != 1:
        raise ExpectationError(
            f"expected one Running operator pod, saw {[p.status.phase for p in pods]}"
        )
    pod = running[0]
    if pod.spec.service_account_name != RELEASE:
        raise ExpectationError(
            f"operator pod runs as {pod.spec.service_account_name}, not {RELEASE}"
        )
    return pod


def seed_volumes(user: User, root: Path) -> None:
    """Claims models, data and out in the team's namespace, on hostPath PersistentVolumes."""
    volumes = {claim: root / claim for claim in ("models", "data", "out")}
    for claim, path in volumes.items():
        bind_hostpath_claim(user.core, TEAM, claim, path)
    build_tiny_model(volumes["models"] / "tiny-llama")
    write_corpus(volumes["data"] / "corpus" / "train.jsonl", repeat=8)
    # The trainer runs as UID 65532: what it reads must be readable by others (safetensors
    # writes its files 0600), as on any shared volume.
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)


def tiny_job(name: str, training: dict[str, Any]) -> dict[str, Any]:
    job = tiny_finetunejob(name, training, "corpus/train.jsonl", ("out", f"adapters/{name}"))
    job["spec"]["resources"] = {"cpu": "1", "memory": "6Gi"}
    job["spec"]["backoffLimit"] = 0  # a deleted pod must not count: one failure would end it
    return job


def wide_row(table: str) -> dict[str, str]:
    """The first row of `kubectl get ... -o wide` output as {column: cell}; cells are cut at the
    header's column starts, since an empty cell leaves no word to split on."""
    header, row = table.splitlines()[:2]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    ends = [*starts[1:], None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}


def get_wide(user: User, name: str) -> dict[str, str]:
    return wide_row(user.kubectl("get", "ftj", name, "-n", TEAM, "-o", "wide"))


def train_and_resume(user: User, volumes: Path) -> dict[str, Any]:
    """The QLoRA job: progress in kubectl, a graceful pod deletion, the resumed run to the end."""
    training = {**TINY_QLORA, "num_input_records_to_sample": STEPS * 4}
    user.kubectl("apply", "-n", TEAM, "-f", "-", stdin=json.dumps(tiny_job("tiny", training)))

    def mid_run() -> dict[str, str] | None:
        row = get_wide(user, "tiny")
        if row.get("PHASE") in ("Failed", "Succeeded"):
            raise ExpectationError(f"the job ended {row['PHASE']} early: {row.get('MESSAGE')}")
        progress = row.get("PROGRESS", "<none>")
        if row.get("PHASE") == "Running" and progress.isdigit() and 10 <= int(progress) < 60:
            return row if row.get("LOSS") not in (None, "", "<none>") else None
        return None

    row = wait_for(mid_run, 900, "progress and loss in kubectl get ftj", interval=2)
    log(f"kubectl get ftj: {row}")
    running = [p for p in user.pods("tiny") if p.status.phase == "Running"]
    if len(running) != 1:
        raise ExpectationError(f"expected one Running training pod, saw {len(running)}")
    first = running[0]
    logs = user.kubectl("logs", "-n", TEAM, first.metadata.name)
    if "finetune_trainer.training: step" not in logs:
        raise ExpectationError(f"kubectl logs shows no training steps: {logs[-500:]!r}")
    container_id = first.status.container_statuses[0].container_id
    log(f"deleting {first.metadata.name} ({container_id}) while it trains")
    user.kubectl("delete", "pod", "-n", TEAM, first.metadata.name, "--wait=false")

    def ended() -> dict[str, Any] | None:
        status = user.status("tiny")
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(ended, 1200, "the job to end", interval=3)
    if status["phase"] != "Succeeded":
        raise ExpectationError(f"the job ended {status['phase']}: {status.get('message')}")
    (job,) = user.batch.list_namespaced_job(TEAM, label_selector=user.selector("tiny")).items
    if job.status.failed:
        raise ExpectationError(
            f"the deleted pod used up a retry (Job status.failed={job.status.failed})"
        )
    result = status["result"]
    adapter = volumes / "out" / "adapters" / "tiny" / "adapter_model.safetensors"
    if result.get("steps") != STEPS or not adapter.is_file():
        raise ExpectationError(f"expected {STEPS} steps and an adapter, got {result}")
    finished = [p for p in user.pods("tiny") if p.status.phase == "Succeeded"]
    last = finished[0].status.container_statuses[0].container_id
    return {
        "node": status["placement"]["node"],
        "containerID": last,
        "steps": result["steps"],
        "resumed": result.get("resumedFromStep") is not None,
        "resumedFromStep": result.get("resumedFromStep"),
        "phase": status["phase"],
    }


def fp8_fails_with_the_trainers_line(user: User) -> str:
    training = {**TINY_QLORA, "quantization_scheme": "fp8", "num_input_records_to_sample": 40}
    job = tiny_job("fp8", training)
    user.kubectl("apply", "-n", TEAM, "-f", "-", stdin=json.dumps(job))

    def failed() -> dict[str, Any] | None:
        status = user.status("fp8")
        return status if status.get("phase") in ("Failed", "Succeeded") else None

    status = wait_for(failed, 600, "the fp8 job to end", interval=2)
    condition = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), None)
    if status["phase"] != "Failed" or condition is None or condition["reason"] != "InvalidInput":
        raise ExpectationError(f"fp8 on a CPU node should fail with InvalidInput, got {status}")
    return str(condition["message"])


@contextmanager
def real_cluster(workdir: Path) -> Iterator[tuple[LocalCluster, RealNode]]:
    local = LocalCluster(workdir / "cluster", node_address=default_address())
    local.start()
    try:
        # A Hopper's labels: the fp8 job must be placed to reach the trainer's own hardware check.
        with RealNode(local, workdir / "node", name="realnode-h100", gpu="h100") as node:
            yield local, node
    finally:
        local.stop()


def run() -> dict[str, Any]:
    started = time.monotonic()
    images = build_images()
    log(f"images: {json.dumps(images)}")
    with tempfile.TemporaryDirectory(prefix="finetune-e2e-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the trainer (UID 65532) reads the volumes below it
        with real_cluster(workdir) as (local, node):
            for image in images.values():
                node.import_image(Path(image["archive"]))
            user = User(local.kubeconfig)
            operator_pod = install_chart(user, images, workdir)
            log(
                f"operator pod {operator_pod.metadata.name} Running on {operator_pod.spec.node_name}"
            )
            user.restricted_namespace(TEAM)
            seed_volumes(user, workdir / "volumes")
            trained = train_and_resume(user, workdir / "volumes")
            message = fp8_fails_with_the_trainers_line(user)
            log(f"fp8: Failed/InvalidInput: {message}")
            user.run("helm", "uninstall", RELEASE, "-n", SYSTEM, "--wait")
    return {
        **trained,
        "images": {target: image["id"] for target, image in images.items()},
        "fp8": message,
        "seconds": round(time.monotonic() - started),
    }


def main() -> int:
    try:
        outcome = run()
    except ExpectationError as failure:
        print(f"e2e: FAILED: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e2e: interrupted (everything it started is stopped)", file=sys.stderr)
        return 130
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
