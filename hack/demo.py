"""`make demo`: finetune-operator on a local control plane, end to end.

1. Boots etcd, kube-apiserver, kube-scheduler and kube-controller-manager on loopback.
2. Registers simulated GPU nodes (T4, A100, A10, L40S, H100, B200) with GPU Feature Discovery
   labels and one allocatable nvidia.com/gpu each.
3. Installs the CRD and runs the operator.
4. Applies one FineTuneJob per quantization scheme (and one too large for any GPU), then prints
   where the real kube-scheduler put each one and why.
5. Runs one real fine-tune: a tiny Llama (built on the spot) with bnb-4bit QLoRA on the CPU. A
   kubelet stand-in runs the training pod's container command as a local process with the pod's
   volumes and environment; `kubectl get ftj` shows its progress, and the adapter lands on the
   output volume.
6. Tears everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from gpusim import GPU_TYPES, FakeKubelet, bind_hostpath_claim, create_gpu_node
from localcluster import REPO, LocalCluster
from podrunner import LocalRuntime
from tinymodel import TINY_QLORA, tiny_finetunejob, write_corpus

# Pod Security admission enforces the restricted profile on the demo's training pods.
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
NAMESPACE = "demo"
TRAINER_IMAGE = "local/finetune-trainer:dev"
TINY_JOB = tiny_finetunejob(
    "tiny-qlora",
    {**TINY_QLORA, "num_input_records_to_sample": 1600},
    "train.jsonl",
    ("adapters", "tiny-qlora"),
)
JOBS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("qlora-4bit", {"quantize_model": True, "quantization_scheme": "bnb-4bit", "lora_r": 16}, {}),
    ("qlora-8bit", {"quantize_model": True, "quantization_bits": 8}, {}),
    (
        "fp8-hopper",
        {"quantize_model": True, "quantization_scheme": "fp8", "peft_implementation": "lora"},
        {},
    ),
    (
        "nvfp4-blackwell",
        {"quantize_model": True, "quantization_scheme": "nvfp4", "peft_implementation": "lora"},
        {},
    ),
    (
        "mxfp4",
        {"quantize_model": True, "quantization_scheme": "mxfp4", "peft_implementation": "lora"},
        {},
    ),
    (
        "lora-bf16",
        {
            "quantize_model": False,
            "peft_implementation": "lora",
            "pretrained_model": "meta-llama/Llama-3.2-1B",
            "learning_rate": 0.0002,  # 'auto' knows no class of that name (Safe Synthesizer's)
        },
        {},
    ),
    (
        "too-big",
        {
            "quantize_model": False,
            "peft_implementation": "lora",
            "pretrained_model": "acme/giant-405b",
        },
        {"model": {"parametersBillions": 405}},
    ),
]


def say(text: str = "") -> None:
    print(text, flush=True)


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["kubectl", *args], input=stdin, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise SystemExit(f"demo: timed out waiting for {what}")


def manifest(name: str, training: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"claimName": "data", "path": "train.jsonl"},
        "output": {"claimName": "adapters", "path": name},
        "training": training,
        **extra,
    }
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def settled(custom: client.CustomObjectsApi) -> bool:
    items = custom.list_namespaced_custom_object(
        "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs"
    )["items"]
    if len(items) < len(JOBS):
        return False
    for item in items:
        status = item.get("status", {})
        scheduled = next(
            (c for c in status.get("conditions", []) if c["type"] == "Scheduled"), None
        )
        if status.get("phase") != "Running" and not (scheduled and scheduled["status"] == "False"):
            return False
    return True


def explain(custom: client.CustomObjectsApi) -> None:
    items = custom.list_namespaced_custom_object(
        "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs"
    )["items"]
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        status = item["status"]
        placement = status.get("placement", {})
        need = f"needs compute capability ≥ {placement.get('requiredComputeCapability')} ({placement.get('architecture')} or newer)"
        if placement.get("estimatedGpuMemoryMiB"):
            need += f", about {placement['estimatedGpuMemoryMiB']} MiB per GPU"
        scheduled: dict[str, Any] = next(
            (c for c in status.get("conditions", []) if c["type"] == "Scheduled"), {}
        )
        if placement.get("node"):
            where = f"-> {placement['node']} ({placement.get('nodeComputeCapability')} {placement.get('gpuProduct')})"
        else:
            where = f"-> not placed: {scheduled.get('reason')}: {scheduled.get('message')}"
        say(f"  {item['metadata']['name']:<16} {placement.get('scheme', '?'):<9} {need}")
        say(f"  {'':<16} {where}")


def train(
    root: Path,
    env: dict[str, str],
    server: str,
    api: client.ApiClient,
    custom: client.CustomObjectsApi,
) -> None:
    # Built in a child process: loading torch and transformers is noisy on stderr.
    subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tinymodel import build_tiny_model; build_tiny_model(Path(sys.argv[1]))",
         str(root / "volumes" / "models" / "tiny-llama")],
        cwd=Path(__file__).parent, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    write_corpus(root / "volumes" / "data" / "train.jsonl", repeat=10)
    runtime = LocalRuntime.for_trainer(
        client.CoreV1Api(api), server, TRAINER_IMAGE, root / "runtime"
    )
    with FakeKubelet(api, runner=runtime):
        kubectl(env, "apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(TINY_JOB))
        say("   kubectl get ftj -o wide, every 2 s while it trains:")
        last = ""
        while True:
            item = custom.get_namespaced_custom_object(
                "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", "tiny-qlora"
            )
            header, row = kubectl(
                env, "get", "ftj", "tiny-qlora", "-n", NAMESPACE, "-o", "wide"
            ).splitlines()[:2]
            if not last:
                say(header)
            if row != last:
                say(row)
                last = row
            if item.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(2)
    status = item["status"]
    say(
        f"\n   phase {status['phase']}: "
        + next(
            c["message"]
            for c in status["conditions"]
            if c["type"] in ("Complete", "Failed") and c["status"] == "True"
        )
    )
    say(f"   result: {json.dumps(status.get('result', {}))}")
    adapter = root / "volumes" / "adapters" / "tiny-qlora"
    say(
        "   on the output volume: "
        + ", ".join(sorted(p.name for p in adapter.iterdir() if p.is_file()))
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default=str(REPO / ".cluster" / "demo"), help="state directory")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    say("== 1. local control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager)")
    cluster = LocalCluster(root / "cluster").start()
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    operator: subprocess.Popen[bytes] | None = None
    try:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        say(f"   API server {cluster.server}; KUBECONFIG={cluster.kubeconfig}")

        say("== 2. simulated GPU nodes (GPU Feature Discovery labels, 1 x nvidia.com/gpu each)")
        for key, gpu in GPU_TYPES.items():
            create_gpu_node(core, f"gpu-{key}", gpu, gpus=1)
        say(
            kubectl(
                env,
                "get",
                "nodes",
                "-L",
                "nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor,nvidia.com/gpu.memory",
            )
        )

        say("== 3. CRD and operator")
        kubectl(env, "apply", "-f", str(REPO / "crds" / "finetunejobs.finetune.dev.yaml"))
        cluster.wait_crd_established("finetunejobs.finetune.dev")
        log = open(root / "operator.log", "wb")  # noqa: SIM115 - the child writes it until the end
        operator = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator.main", "--namespace", NAMESPACE,
             "--trainer-image", TRAINER_IMAGE, "--progress-interval", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE, labels=RESTRICTED))
        )
        for claim in ("data", "adapters", "models"):
            bind_hostpath_claim(core, NAMESPACE, claim, root / "volumes" / claim)
        for claim in ("data", "adapters", "models"):
            wait(
                lambda c=claim: core.read_namespaced_persistent_volume_claim(c, NAMESPACE).status.phase == "Bound",  # type: ignore[misc]
                60, f"claim {claim} to bind",
            )  # fmt: skip
        say(f"   operator running (log: {root / 'operator.log'})")

        say("== 4. one FineTuneJob per scheme")
        with FakeKubelet(api, auto_start=True):
            for name, training, extra in JOBS:
                kubectl(
                    env,
                    "apply",
                    "-n",
                    NAMESPACE,
                    "-f",
                    "-",
                    stdin=yaml.safe_dump(manifest(name, training, extra)),
                )
            wait(lambda: settled(custom), 120, "every job to be placed or diagnosed")
            say(kubectl(env, "get", "ftj", "-n", NAMESPACE, "-o", "wide"))
            say("   where each one landed, and why:")
            explain(custom)
            kubectl(env, "delete", "ftj", "--all", "-n", NAMESPACE, "--wait=true")
            wait(lambda: not core.list_namespaced_pod(NAMESPACE).items, 60, "the pods to go")
        say("\n== 5. a real fine-tune: tiny Llama, bnb-4bit QLoRA, on this machine's CPU")
        if os.geteuid() != 0:
            say("   skipped: the local container runtime needs root (a private mount namespace)")
        else:
            train(root, env, cluster.server, api, custom)
        if args.keep:
            say(f"\n--keep: cluster left running; export KUBECONFIG={cluster.kubeconfig}")
            return 0
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=20)
        if not args.keep:
            say("== 6. tear down")
            cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
