"""Simulated GPU nodes and a stand-in kubelet for the local control plane (tests and the demo).

Nodes carry the labels NVIDIA GPU Feature Discovery writes and allocatable `nvidia.com/gpu`, so
the real kube-scheduler places pods on them; or, for Dynamic Resource Allocation, ResourceSlices of
the NVIDIA DRA driver describe their GPUs (`publish_gpus`). `FakeKubelet` does what a kubelet would for pods bound
to those nodes: reports them Running, finishes them with an exit code and termination message,
completes graceful deletions, and can run a pod's container command as a local process with the
pod's environment and volumes (`execute`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from finetune_api.gpu import ComputeCapability

log = logging.getLogger("gpusim")
SIM_LABEL = "finetune.dev/simulated"


@dataclass(frozen=True)
class GpuType:
    name: str  # NVML's device name, which the NVIDIA DRA driver publishes as productName
    major: int
    minor: int
    memory_mib: int
    family: str

    @property
    def product(self) -> str:
        """The nvidia.com/gpu.product label: GPU Feature Discovery writes NVML's name with
        dashes for spaces."""
        return self.name.replace(" ", "-")

    @property
    def capability(self) -> ComputeCapability:
        return ComputeCapability(self.major, self.minor)


GPU_TYPES: dict[str, GpuType] = {
    "t4": GpuType("Tesla T4", 7, 5, 15360, "turing"),
    "a100": GpuType("NVIDIA A100-SXM4-80GB", 8, 0, 81920, "ampere"),
    "a10": GpuType("NVIDIA A10", 8, 6, 23028, "ampere"),
    "l40s": GpuType("NVIDIA L40S", 8, 9, 46068, "ada-lovelace"),
    "h100": GpuType("NVIDIA H100 80GB HBM3", 9, 0, 81559, "hopper"),
    "b200": GpuType("NVIDIA B200", 10, 0, 183359, "blackwell"),
}


def gfd_labels(gpu: GpuType, count: int) -> dict[str, str]:
    return {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": gpu.product,
        "nvidia.com/gpu.compute.major": str(gpu.major),
        "nvidia.com/gpu.compute.minor": str(gpu.minor),
        "nvidia.com/gpu.memory": str(gpu.memory_mib),
        "nvidia.com/gpu.family": gpu.family,
        "nvidia.com/gpu.count": str(count),
    }


def create_gpu_node(core: client.CoreV1Api, name: str, gpu: GpuType | None, gpus: int = 1) -> None:
    """A Ready node with the usual GPU taint and, for a `gpu` type (the device plugin's view), GFD
    labels and `gpus` allocatable nvidia.com/gpu. `gpu=None`: a node whose GPUs only DRA offers
    (publish them with `publish_gpus`)."""
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", SIM_LABEL: "true"}
    if gpu is not None:
        labels.update(gfd_labels(gpu, gpus))
    body = client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels))
    core.create_node(body)
    amounts = {"cpu": "32", "memory": "256Gi", "pods": "110"}
    if gpu is not None:
        amounts["nvidia.com/gpu"] = str(gpus)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "status": {
            "capacity": amounts,
            "allocatable": amounts,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
            ],
        }
    }  # fmt: skip
    core.patch_node_status(name, status)
    # The API server taints new nodes not-ready until a kubelet reports; no kubelet will here.
    # Keep only the GPU taint GPU operators usually set.
    taints = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    core.patch_node(name, {"spec": {"taints": taints}})


def delete_node(core: client.CoreV1Api, name: str) -> None:
    with contextlib.suppress(ApiException):
        core.delete_node(name)


# Dynamic Resource Allocation, as the NVIDIA DRA driver for GPUs publishes a node's GPUs (the names
# and their sources: finetune_operator.dra). The real driver's kubelet plugin writes the slices;
# here the test writes them, and no kubelet plugin prepares the devices (the stand-in kubelets
# start containers without calling a DRA driver).
DRA_DRIVER = "gpu.nvidia.com"


def device_class() -> dict[str, Any]:
    """The DeviceClass the NVIDIA driver's Helm chart installs for full GPUs."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": DRA_DRIVER, "labels": {SIM_LABEL: "true"}},
        "spec": {
            "selectors": [
                {"cel": {"expression": f"device.driver == '{DRA_DRIVER}' && "
                                       f"device.attributes['{DRA_DRIVER}'].type == 'gpu'"}}
            ]
        },
    }  # fmt: skip


def gpu_device(gpu: GpuType, index: int, node: str) -> dict[str, Any]:
    """One full GPU as the driver's kubelet plugin describes it: device gpu-<minor>, NVML's name,
    go-nvlib's architecture, the compute capability as a version, NVML's total memory in bytes."""
    uuid = f"GPU-{hashlib.sha256(f'{node}/{index}'.encode()).hexdigest()[:32]}"
    return {
        "name": f"gpu-{index}",
        "attributes": {
            "type": {"string": "gpu"},
            "uuid": {"string": uuid},
            "productName": {"string": gpu.name},
            "brand": {"string": "Nvidia"},
            "architecture": {"string": gpu.capability.architecture},
            "cudaComputeCapability": {"version": f"{gpu.major}.{gpu.minor}.0"},
            "driverVersion": {"version": "580.95.5"},
            "cudaDriverVersion": {"version": "13.0.0"},
            "pcieBusID": {"string": f"0000:{0x18 + index:02x}:00.0"},
        },
        "capacity": {"memory": {"value": str(gpu.memory_mib * 1024 * 1024)}},
    }


def publish_gpus(
    api: client.ApiClient, node: str, gpus: list[GpuType], pool_generation: int = 1
) -> str:
    """A ResourceSlice of the NVIDIA driver for `node`: pool named after the node, one device per
    entry of `gpus` (gpu-0, gpu-1, ...). Returns the slice's name."""
    name = f"{node}-{DRA_DRIVER}"
    body = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name, "labels": {SIM_LABEL: "true"}},
        "spec": {
            "driver": DRA_DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": pool_generation, "resourceSliceCount": 1},
            "devices": [gpu_device(gpu, i, node) for i, gpu in enumerate(gpus)],
        },
    }
    client.ResourceV1Api(api).create_resource_slice(body)
    return name


def install_device_class(api: client.ApiClient) -> None:
    with contextlib.suppress(ApiException):  # 409: already there
        client.ResourceV1Api(api).create_device_class(device_class())


def delete_slice(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(ApiException):
        client.ResourceV1Api(api).delete_resource_slice(name)


def bind_hostpath_claim(core: client.CoreV1Api, namespace: str, claim: str, host_dir: Path) -> None:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume (PV name: NAMESPACE-CLAIM)
    on `host_dir`, which the local container runtime mounts for pods using the claim."""
    host_dir.mkdir(parents=True, exist_ok=True)
    host_dir.chmod(0o777)
    pv_name = f"{namespace}-{claim}"
    core.create_persistent_volume(
        client.V1PersistentVolume(
            metadata=client.V1ObjectMeta(name=pv_name, labels={SIM_LABEL: "true"}),
            spec=client.V1PersistentVolumeSpec(
                capacity={"storage": "10Gi"},
                access_modes=["ReadWriteOnce"],
                host_path=client.V1HostPathVolumeSource(path=str(host_dir)),
                storage_class_name="",
                persistent_volume_reclaim_policy="Retain",
                claim_ref=client.V1ObjectReference(namespace=namespace, name=claim),
            ),
        )
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=claim),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                storage_class_name="",
                volume_name=pv_name,
                resources=client.V1ResourceRequirements(requests={"storage": "10Gi"}),
            ),
        ),
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_status_running(pod: Any) -> dict[str, Any]:
    now = _now()
    container = pod.spec.containers[0]
    return {
        "status": {
            "phase": "Running",
            "startTime": now,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {"name": container.name, "image": container.image, "imageID": "", "ready": True,
                 "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}}},
            ],
        }
    }  # fmt: skip


def pod_status_terminated(pod: Any, exit_code: int, message: str = "") -> dict[str, Any]:
    now = _now()
    container = pod.spec.containers[0]
    started = now
    for status in pod.status.container_statuses or []:
        if status.state and status.state.running and status.state.running.started_at:
            started = status.state.running.started_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    terminated = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "message": message,
        "startedAt": started,
        "finishedAt": now,
    }
    return {
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {"name": container.name, "image": container.image, "imageID": "", "ready": False,
                 "restartCount": 0, "started": False, "state": {"terminated": terminated}},
            ],
        }
    }  # fmt: skip


class FakeKubelet:
    """Plays the kubelet for simulated nodes, in a background thread.

    auto_start: report bound pods Running as soon as they are bound.
    runner: when set, called in a thread for each bound pod (`make demo` executes its command
    with hack/podrunner.py); it returns (exit_code, termination_message) and the pod is finished
    with them.
    stop_delay: seconds a deleted pod's container takes to stop.
    """

    def __init__(
        self,
        api: client.ApiClient,
        auto_start: bool = True,
        runner: Callable[[Any], tuple[int, str]] | None = None,
        stop_delay: float = 1.5,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.auto_start = auto_start
        self.runner = runner
        self._stop = threading.Event()
        self.stop_delay = stop_delay
        self._seen: set[str] = set()
        self._stopping: set[str] = set()
        self._reported: dict[str, threading.Event] = {}
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)

    def __enter__(self) -> FakeKubelet:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _simulated_nodes(self) -> set[str]:
        nodes = self.core.list_node(label_selector=SIM_LABEL)
        return {n.metadata.name for n in nodes.items}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                stream = watch.Watch()
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces, timeout_seconds=5
                ):
                    if self._stop.is_set():
                        stream.stop()
                        break
                    self._handle(event["object"])
            except Exception:  # keep playing the kubelet through API hiccups
                log.exception("fake kubelet watch failed; retrying")
                time.sleep(0.5)

    def _handle(self, pod: Any) -> None:
        node = pod.spec.node_name
        if not node or node not in self._simulated_nodes():
            return
        key = pod.metadata.uid
        if pod.metadata.deletion_timestamp is not None:
            if key not in self._stopping:
                self._stopping.add(key)
                threading.Thread(target=self._stop_pod, args=(pod,), daemon=True).start()
            return
        if key in self._seen or pod.status.phase in ("Succeeded", "Failed"):
            return
        self._seen.add(key)
        if self.auto_start or self.runner is not None:
            self.set_running(pod)
        if self.runner is not None:
            self._reported[key] = threading.Event()
            threading.Thread(target=self._run, args=(pod,), daemon=True).start()

    def _stop_pod(self, pod: Any) -> None:
        """As a kubelet does on a graceful deletion: the container gets SIGTERM and takes a moment
        to stop (exit 143), the pod ends Failed, then the kubelet removes it. A runner with a
        `stop(pod, grace)` (podrunner) really signals the process and waits for it, within the
        pod's grace period; the pod then ends with the process's own exit status."""
        stop = getattr(self.runner, "stop", None)
        grace = pod.metadata.deletion_grace_period_seconds or 30
        reported = self._reported.get(pod.metadata.uid)
        if stop is not None and reported is not None and stop(pod, grace):
            reported.wait(timeout=grace + 30)  # _run reports the exit status
        else:
            time.sleep(self.stop_delay)
        with contextlib.suppress(ApiException):
            fresh = self.core.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
            if fresh.status.phase not in ("Succeeded", "Failed"):
                self.core.patch_namespaced_pod_status(
                    pod.metadata.name,
                    pod.metadata.namespace,
                    pod_status_terminated(fresh, 143, "terminated by SIGTERM"),
                )
            self.core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
            )

    def _run(self, pod: Any) -> None:
        try:
            exit_code, message = self.runner(pod) if self.runner else (0, "")
        except Exception as exc:  # the runner itself broke: the container "crashed"
            log.exception("runner failed")
            exit_code, message = 128, f"simulated runtime error: {exc}"
        try:
            self.finish(pod, exit_code, message)
        finally:
            self._reported[pod.metadata.uid].set()

    def set_running(self, pod: Any) -> None:
        self.core.patch_namespaced_pod_status(
            pod.metadata.name, pod.metadata.namespace, pod_status_running(pod)
        )

    def finish(self, pod: Any, exit_code: int, message: str = "") -> None:
        """End the pod's container with this exit code and termination message (a pod deleted
        meanwhile has nothing left to report)."""
        try:
            fresh = self.core.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        self.core.patch_namespaced_pod_status(
            pod.metadata.name,
            pod.metadata.namespace,
            pod_status_terminated(fresh, exit_code, message),
        )
