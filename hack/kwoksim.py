"""Fake GPU nodes at scale, played by KWOK (sigs.k8s.io/kwok) instead of our own stand-in kubelet.

The `kwok` controller (built by hack/kwok-binaries.sh from its Go module) runs as a local process
against the local control plane. It manages the nodes annotated `kwok.x-k8s.io/node: fake` and the
pods bound to them, by its stages: nodes become Ready (node-initialize), pods bound to them become
Running (pod-ready) and deleted ones go away (pod-delete). Our config leaves out pod-complete (a
Job's pods would finish at once and hand their GPUs to the next job) and the node heartbeat (the
local control plane runs no node lifecycle controller, so nothing would mark a silent node
NotReady): the training pods hold their GPUs as long fine-tunes do.

Nodes carry what hack/gpusim.py gives its own: GPU Feature Discovery labels, allocatable
`nvidia.com/gpu`, the GPU taint.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client

from gpusim import GPU_TYPES, GpuType, gfd_labels
from localcluster import stop_process

HACK = Path(__file__).resolve().parent
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_LABEL = "finetune.dev/kwok"  # ours: which nodes this module made
STAGES = ("node-initialize", "pod-ready", "pod-delete")
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def kwok_cache() -> Path:
    """The cache hack/kwok-binaries.sh fills (built on first use; its last line is the dir)."""
    out = subprocess.run(
        [str(HACK / "kwok-binaries.sh")], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def kwok_config(cache: Path) -> str:
    """A --config for the kwok controller: its options, then the stages it plays (YAML
    documents taken unchanged from the module)."""
    options = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "manageAllNodes": False,
            "manageNodesWithAnnotationSelector": f"{KWOK_ANNOTATION}=fake",
            "cidr": "10.0.0.0/16",  # pod IPs: room for every pod of a large run
            "nodeLeaseDurationSeconds": 0,  # no leases, no heartbeat: see the module's docstring
            "nodePort": 0,  # no kubelet server (logs, exec): nothing here asks for them
            "podPlayStageParallelism": 8,
            "nodePlayStageParallelism": 8,
        },
    }
    docs = [json.dumps(options)]
    docs += [(cache / "stages" / f"{name}.yaml").read_text() for name in STAGES]
    return "\n---\n".join(docs)


@contextlib.contextmanager
def kwok_controller(kubeconfig: Path, root: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The kwok controller as a local process, stopped on exit; its log is root/kwok.log."""
    cache = kwok_cache()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "kwok.yaml"
    config.write_text(kwok_config(cache))
    log = open(root / "kwok.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(
        [str(cache / "kwok"), "--kubeconfig", str(kubeconfig), "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        stop_process(proc, grace=10)
        log.close()


@dataclass(frozen=True)
class FakeNode:
    name: str
    gpu: GpuType
    gpus: int


def mixed_nodes(count: int, prefix: str = "kwok-gpu") -> list[FakeNode]:
    """`count` nodes cycling through the GPU generations (T4 … B200) and 1, 2, 4 or 8 GPUs each."""
    kinds = list(GPU_TYPES.values())
    sizes = (1, 2, 4, 8)
    return [
        FakeNode(f"{prefix}-{i:05d}", kinds[i % len(kinds)], sizes[(i // len(kinds)) % len(sizes)])
        for i in range(count)
    ]


def node_body(node: FakeNode) -> client.V1Node:
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "type": "kwok",
        KWOK_LABEL: "true",
        **gfd_labels(node.gpu, node.gpus),
    }
    amounts = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(node.gpus)}
    return client.V1Node(
        metadata=client.V1ObjectMeta(
            name=node.name, labels=labels, annotations={KWOK_ANNOTATION: "fake"}
        ),
        spec=client.V1NodeSpec(taints=[client.V1Taint(**GPU_TAINT)]),
        status=client.V1NodeStatus(capacity=amounts, allocatable=amounts),
    )


def create_nodes(core: client.CoreV1Api, nodes: list[FakeNode], workers: int = 16) -> None:
    """Create the nodes (KWOK fills in their status). The API server taints a new node not-ready
    until its controller lifts it; no node lifecycle controller runs here, so keep only the GPU
    taint, as hack/gpusim.py does."""

    def one(node: FakeNode) -> None:
        core.create_node(node_body(node))
        core.patch_node(node.name, {"spec": {"taints": [GPU_TAINT]}})

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, nodes))


def ready_nodes(core: client.CoreV1Api) -> int:
    """How many of our nodes KWOK reports Ready, untainted but for the GPU taint."""
    count = 0
    for node in core.list_node(label_selector=KWOK_LABEL).items:
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        taints = [t.key for t in node.spec.taints or []]
        count += ready and taints == [GPU_TAINT["key"]]
    return count


def wait_ready(core: client.CoreV1Api, count: int, timeout: float = 600) -> float:
    """Wait until `count` of our nodes are Ready; the seconds it took."""
    start = time.monotonic()
    while ready_nodes(core) < count:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"KWOK did not make {count} nodes Ready in {timeout:.0f} s")
        time.sleep(1)
    return time.monotonic() - start
