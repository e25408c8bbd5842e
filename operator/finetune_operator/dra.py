"""GPUs through Dynamic Resource Allocation (resource.k8s.io/v1), as the NVIDIA DRA driver for GPUs
describes them: the device request of a job's ResourceClaimTemplate, and, read back, which devices
the ResourceSlices offer and which ones a ResourceClaim was allocated (pure functions).

The names below are the driver's own. From NVIDIA/k8s-dra-driver-gpu (now developed as
kubernetes-sigs/dra-driver-nvidia-gpu):

* driver name `gpu.nvidia.com`: `DriverName` in `cmd/gpu-kubelet-plugin/main.go`;
* one pool per node, named after the node: `GenerateDriverResources` in
  `cmd/gpu-kubelet-plugin/driver.go` (`Pools: {nodeName: ...}`);
* a full GPU is the device `gpu-<minor>` with the attributes `type` ("gpu"; "mig" and "vfio" for the
  other kinds), `uuid`, `productName` (NVML's name, e.g. "NVIDIA H100 80GB HBM3"), `brand`,
  `architecture` (go-nvlib's name: "Ampere", "Ada Lovelace", "Hopper", "Blackwell", ...),
  `cudaComputeCapability` (a version: "9.0" becomes "9.0.0"), `driverVersion`, `cudaDriverVersion`,
  `pcieBusID`, and the capacity `memory` (NVML's total, in bytes): `GpuInfo.GetDevice` in
  `cmd/gpu-kubelet-plugin/deviceinfo.go`, filled by `getGpuInfo` in `cmd/gpu-kubelet-plugin/nvlib.go`;
* the DeviceClass `gpu.nvidia.com` selects
  `device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'`:
  `deployments/helm/nvidia-dra-driver-gpu/templates/deviceclass-gpu.yaml`.

The CEL comparisons are Kubernetes' own: a version attribute is a semver value
(`.compareTo(semver('9.0.0')) >= 0`), a capacity a quantity (`.compareTo(quantity('40Gi')) >= 0`, the
form the API reference gives for `CapacityRequirements`). tests/integration/test_dra.py proves them
with the real API server and scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.utils import parse_quantity

from finetune_api.gpu import ComputeCapability
from finetune_operator.placement import GpuNode, GpuRequirement

DRIVER = "gpu.nvidia.com"
DEVICE_CLASS = "gpu.nvidia.com"
DEVICE_TYPE_GPU = "gpu"
ATTR_TYPE = "type"
ATTR_PRODUCT = "productName"
ATTR_ARCHITECTURE = "architecture"
ATTR_CAPABILITY = "cudaComputeCapability"
CAPACITY_MEMORY = "memory"
REQUEST = "gpus"  # the request's name in the claim, and the pod's name for the claim
MIB = 1024 * 1024
NO_DEVICES = f"no GPUs of the NVIDIA DRA driver ({DRIVER}) in the cluster's ResourceSlices"


def capability_selector(minimum: ComputeCapability) -> str:
    """CEL admitting a device whose compute capability is at least `minimum`, as versions
    compare: 8.9 admits 8.9, 9.0 and 10.0 and refuses 8.0 and 8.6."""
    return (
        f"device.attributes['{DRIVER}'].{ATTR_CAPABILITY}"
        f".compareTo(semver('{minimum.major}.{minimum.minor}.0')) >= 0"
    )


def memory_selector(mib: int) -> str:
    """CEL admitting a device with at least `mib` MiB of memory."""
    return f"device.capacity['{DRIVER}'].{CAPACITY_MEMORY}.compareTo(quantity('{mib}Mi')) >= 0"


def selectors(requirement: GpuRequirement) -> list[str]:
    """The job's device selectors: compute capability, and memory when the estimate applies."""
    found = [capability_selector(requirement.min_capability)]
    if requirement.min_memory_mib is not None:
        found.append(memory_selector(requirement.min_memory_mib))
    return found


@dataclass(frozen=True)
class GpuDevice:
    """One full GPU of a ResourceSlice, as the NVIDIA DRA driver publishes it."""

    node: str | None  # the slice's nodeName
    pool: str
    name: str
    capability: ComputeCapability | None
    memory_mib: int | None
    product: str

    @property
    def ref(self) -> str:
        """How the status names it: POOL/DEVICE (the pool is the node's name)."""
        return f"{self.pool}/{self.name}"

    def as_gpu(self) -> GpuNode:
        """The same facts in the shape the device-plugin diagnosis reads."""
        return GpuNode(
            name=self.ref, capability=self.capability, memory_mib=self.memory_mib,
            product=self.product,
        )  # fmt: skip


def _attribute(attributes: Mapping[str, Any], name: str) -> Any:
    """An attribute's value, under its short name or qualified with the driver's domain."""
    entry = attributes.get(name, attributes.get(f"{DRIVER}/{name}"))
    if not isinstance(entry, Mapping):
        return None
    for kind in ("string", "version", "int", "bool"):
        if kind in entry:
            return entry[kind]
    return None


def _capability(version: Any) -> ComputeCapability | None:
    if not isinstance(version, str):
        return None
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    if not (major.isdigit() and minor.isdigit()):
        return None
    return ComputeCapability(int(major), int(minor))


def _memory_mib(capacity: Mapping[str, Any]) -> int | None:
    entry = capacity.get(CAPACITY_MEMORY, capacity.get(f"{DRIVER}/{CAPACITY_MEMORY}"))
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return None
    try:
        return int(parse_quantity(str(entry["value"])) // MIB)
    except ValueError:
        return None


def gpus_in_slice(resource_slice: Mapping[str, Any]) -> list[GpuDevice]:
    """The full GPUs (type "gpu") of one ResourceSlice of the NVIDIA driver; other drivers' slices
    and MIG or VFIO devices give nothing."""
    spec = resource_slice.get("spec") or {}
    if spec.get("driver") != DRIVER:
        return []
    pool = (spec.get("pool") or {}).get("name", "")
    found = []
    for device in spec.get("devices") or []:
        attributes = device.get("attributes") or {}
        if _attribute(attributes, ATTR_TYPE) != DEVICE_TYPE_GPU:
            continue
        found.append(
            GpuDevice(
                node=spec.get("nodeName"),
                pool=pool,
                name=device.get("name", ""),
                capability=_capability(_attribute(attributes, ATTR_CAPABILITY)),
                memory_mib=_memory_mib(device.get("capacity") or {}),
                product=str(_attribute(attributes, ATTR_PRODUCT) or "unknown GPU"),
            )
        )
    return found


def gpus_in_slices(slices: Iterable[Mapping[str, Any]]) -> list[GpuDevice]:
    return [gpu for s in slices for gpu in gpus_in_slice(s)]


@dataclass(frozen=True)
class Allocation:
    """What a ResourceClaim was given: its devices of the NVIDIA driver, looked up in the slices
    (a device no slice lists any more keeps its name, without product or capability)."""

    claim: str
    devices: tuple[GpuDevice, ...]

    @property
    def refs(self) -> list[str]:
        return [d.ref for d in self.devices]

    def summary(self, node: str) -> GpuNode:
        """The node with what its allocated GPUs are (the first one's product and capability)."""
        first = self.devices[0] if self.devices else None
        return GpuNode(
            name=node,
            capability=first.capability if first else None,
            memory_mib=first.memory_mib if first else None,
            product=first.product if first else "unknown GPU",
        )


def allocation(claim: Mapping[str, Any], offered: Iterable[GpuDevice]) -> Allocation | None:
    """The claim's allocation (status.allocation.devices.results), or None while unallocated."""
    results = (((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get(
        "results"
    )
    if not results:
        return None
    known = {(d.pool, d.name): d for d in offered}
    devices = []
    for result in results:
        if result.get("driver") != DRIVER:
            continue
        key = (result.get("pool", ""), result.get("device", ""))
        devices.append(known.get(key) or GpuDevice(None, key[0], key[1], None, None, "unknown GPU"))
    name = (claim.get("metadata") or {}).get("name", "")
    return Allocation(claim=name, devices=tuple(devices))
