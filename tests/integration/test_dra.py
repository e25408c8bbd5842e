"""GPUs through Dynamic Resource Allocation: the operator's ResourceClaimTemplate, the real
controller manager's ResourceClaims and the real kube-scheduler's allocation from ResourceSlices
published as the NVIDIA DRA driver publishes them.

A control plane of its own: its GPU nodes carry no GPU Feature Discovery labels and no
nvidia.com/gpu, so every placement here is the DRA allocation's doing (one device-plugin node is
there only for the test that runs one manifest in both modes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobSpec
from finetune_operator.memory import estimate_memory, model_shape
from gpusim import (
    GPU_TYPES,
    FakeKubelet,
    GpuType,
    bind_hostpath_claim,
    create_gpu_node,
    delete_slice,
    install_device_class,
    publish_gpus,
)
from integration.harness import (
    Cluster,
    Namespace,
    Operator,
    ftj_manifest,
    make_namespace,
    remove_namespace,
    running_cluster,
    scheme_training,
    wait_for,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Pools (nodes) and their GPUs, in device order: several GPUs per node, one node with two kinds.
POOLS: dict[str, list[str]] = {
    "dra-t4": ["t4", "t4"],
    "dra-mixed": ["a10", "a100"],
    "dra-l40s": ["l40s", "l40s"],
    "dra-h100": ["h100"],
    "dra-b200": ["b200"],
}
DEVICES: dict[str, GpuType] = {
    f"{pool}/gpu-{i}": GPU_TYPES[key] for pool, keys in POOLS.items() for i, key in enumerate(keys)
}


def publish(cluster: Cluster, pool: str, keys: list[str]) -> str:
    return publish_gpus(cluster.api, pool, [GPU_TYPES[k] for k in keys])


@pytest.fixture(scope="module")
def dra_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """DRA-only GPU nodes with their ResourceSlices, the NVIDIA DeviceClass, one device-plugin
    node (gpu-h100-dp), a stand-in kubelet, and two operators: DRA for namespaces t-*, the
    device plugin for dp-*."""
    root = tmp_path_factory.mktemp("dra-cluster")
    logs = tmp_path_factory.mktemp("dra-operators")  # the cluster's root goes when it stops
    with running_cluster(root) as cluster:
        install_device_class(cluster.api)
        for pool, keys in POOLS.items():
            create_gpu_node(cluster.core, pool, None)
            publish(cluster, pool, keys)
        create_gpu_node(cluster.core, "gpu-h100-dp", GPU_TYPES["h100"], gpus=1)
        dra_op = Operator(
            cluster, logs / "dra-operator.log", "--namespace", "t-*", "--gpu-allocation", "dra"
        ).start()
        dp_op = Operator(cluster, logs / "dp-operator.log", "--namespace", "dp-*").start()
        try:
            with FakeKubelet(cluster.api, auto_start=True):
                yield cluster
        finally:
            dra_op.stop()
            dp_op.stop()


@pytest.fixture
def namespace(dra_cluster: Cluster, tmp_path: Path) -> Iterator[Namespace]:
    ns = make_namespace(dra_cluster, tmp_path)
    try:
        yield ns
    finally:
        remove_namespace(ns)


def claim_of(ns: Namespace, name: str) -> dict[str, Any] | None:
    """The ResourceClaim Kubernetes made for the job's newest pod, as the API server has it."""
    pods = ns.pods(name)
    statuses = (pods[0].status.resource_claim_statuses or []) if pods else []
    if not statuses or not statuses[0].resource_claim_name:
        return None
    response = client.ResourceV1Api(ns.cluster.api).read_namespaced_resource_claim(
        statuses[0].resource_claim_name, ns.name, _preload_content=False
    )
    claim: dict[str, Any] = json.loads(response.data)
    return claim


def allocated(ns: Namespace, name: str) -> list[str] | None:
    """POOL/DEVICE of each device allocated to the job's claim, once its pod is bound."""
    pods = ns.pods(name)
    if not pods or not pods[0].spec.node_name:
        return None
    claim = claim_of(ns, name)
    results = (((claim or {}).get("status") or {}).get("allocation") or {}).get("devices") or {}
    found = [f"{r['pool']}/{r['device']}" for r in results.get("results") or []]
    return found or None


def scheduled_false(ns: Namespace, name: str, reason: str | None = None) -> Any:
    cond = ns.condition(name, "Scheduled")
    if cond and cond["status"] == "False" and (reason is None or cond["reason"] == reason):
        return cond
    return None


def compatible(minimum: ComputeCapability) -> set[str]:
    return {ref for ref, gpu in DEVICES.items() if gpu.capability >= minimum}


@pytest.mark.parametrize(
    ("scheme", "minimum"),
    [
        ("bnb-4bit", "8.0"),
        ("bnb-8bit", "8.0"),
        ("fp8", "9.0"),
        ("nvfp4", "10.0"),
        ("mxfp4", "9.0"),
        (None, "8.0"),
    ],
)
def test_each_scheme_is_allocated_only_compatible_devices(
    namespace: Namespace, scheme: str | None, minimum: str
) -> None:
    """One job more than there are compatible GPUs: each compatible device is allocated once, the
    extra job waits although incompatible devices (even on the same node) are free."""
    wanted = compatible(ComputeCapability.parse(minimum))
    names = [f"job-{i}" for i in range(len(wanted) + 1)]
    for name in names:
        assert namespace.apply(ftj_manifest(name, scheme_training(scheme))).returncode == 0

    def placed() -> dict[str, list[str] | None] | None:
        devices = {n: allocated(namespace, n) for n in names}
        return devices if sum(v is not None for v in devices.values()) == len(wanted) else None

    devices = wait_for(placed, timeout=120, what=f"{len(wanted)} claims allocated")
    given = [d for found in devices.values() if found for d in found]
    assert sorted(given) == sorted(wanted)  # each compatible device once, nothing else
    waiting = next(n for n, found in devices.items() if found is None)
    cond = wait_for(lambda: scheduled_false(namespace, waiting), what="the extra job waits")
    assert cond["reason"] == "Unschedulable"  # compatible devices exist, they are all taken
    assert f"compute capability ≥ {minimum}" in cond["message"]

    for name, found in devices.items():
        if found is None:
            continue
        (ref,) = found
        status = wait_for(
            lambda n=name: (
                namespace.ftj(n).get("status", {}).get("phase") == "Running"
                and namespace.ftj(n)["status"]
            ),
            what=f"{name} Running",
        )
        placement = status["placement"]
        assert placement["gpuDevices"] == [ref]
        assert placement["node"] == ref.split("/")[0]
        assert placement["gpuProduct"] == DEVICES[ref].name
        assert placement["nodeComputeCapability"] == str(DEVICES[ref].capability)
        assert placement["resourceClaim"] == (claim_of(namespace, name) or {})["metadata"]["name"]
        scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
        assert scheduled["status"] == "True" and ref in scheduled["message"]


def test_claim_template_is_owned_and_pods_carry_no_device_plugin_request(
    namespace: Namespace,
) -> None:
    assert namespace.apply(ftj_manifest("owned", scheme_training("fp8"))).returncode == 0
    wait_for(lambda: allocated(namespace, "owned"), what="allocated")
    uid = namespace.ftj("owned")["metadata"]["uid"]
    templates = client.ResourceV1Api(namespace.cluster.api).list_namespaced_resource_claim_template(
        namespace.name, _preload_content=False
    )
    (template,) = json.loads(templates.data)["items"]
    (owner,) = template["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", uid, True)
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == "gpu.nvidia.com"
    (pod,) = namespace.pods("owned")
    container = pod.spec.containers[0]
    assert "nvidia.com/gpu" not in (container.resources.limits or {})
    assert pod.spec.affinity is None
    claim = claim_of(namespace, "owned") or {}
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "Pod"  # goes with the pod

    # A child like the others: deleted, it is made again (the job has not finished).
    resource = client.ResourceV1Api(namespace.cluster.api)
    resource.delete_namespaced_resource_claim_template("owned-gpus", namespace.name)

    def remade() -> bool:
        found = resource.list_namespaced_resource_claim_template(namespace.name).items
        return any(t.metadata.uid != template["metadata"]["uid"] for t in found)

    wait_for(remade, timeout=60, what="the ResourceClaimTemplate made again")

    namespace.cluster.kubectl(
        "delete", "finetunejob", "owned", "-n", namespace.name, "--wait=true", "--timeout=60s"
    )

    def gone() -> bool:
        api = client.ResourceV1Api(namespace.cluster.api)
        left = api.list_namespaced_resource_claim_template(namespace.name).items
        claims = api.list_namespaced_resource_claim(namespace.name).items
        return not left and not claims

    wait_for(gone, timeout=90, what="template and claim garbage-collected")


def test_several_gpus_come_from_one_node(namespace: Namespace) -> None:
    manifest = ftj_manifest("pair", scheme_training("bnb-4bit"), resources={"gpus": 2})
    assert namespace.apply(manifest).returncode == 0
    found = wait_for(lambda: allocated(namespace, "pair"), timeout=90, what="two devices")
    assert len(found) == 2 and len({ref.split("/")[0] for ref in found}) == 1
    assert all(DEVICES[ref].capability >= ComputeCapability(8, 0) for ref in found)
    status = wait_for(
        lambda: namespace.ftj("pair").get("status", {}).get("placement", {}).get("gpuDevices"),
        what="gpuDevices in the status",
    )
    assert sorted(status) == sorted(found)


@pytest.fixture
def without_blackwell(dra_cluster: Cluster) -> Iterator[None]:
    name = "dra-b200-gpu.nvidia.com"
    delete_slice(dra_cluster.api, name)
    try:
        yield
    finally:
        delete_slice(dra_cluster.api, name)
        wait_for(
            lambda: (
                not client.ResourceV1Api(dra_cluster.api)
                .list_resource_slice(field_selector=f"metadata.name={name}")
                .items
            ),
            what="the test's B200 slice gone",
        )
        publish(dra_cluster, "dra-b200", POOLS["dra-b200"])


def test_waits_with_a_clear_condition_until_a_fitting_device_joins(
    dra_cluster: Cluster, without_blackwell: None, namespace: Namespace
) -> None:
    """Without Blackwell: nvfp4 has no compatible device, and Llama 3.1 70B in 8 bits needs more
    memory than an 80 GB GPU has. Two B200s join (a new slice of the pool): both are placed."""
    assert namespace.apply(ftj_manifest("fp4", scheme_training("nvfp4"))).returncode == 0
    big = ftj_manifest(
        "big",
        {
            "quantize_model": True,
            "quantization_scheme": "bnb-8bit",
            "pretrained_model": "meta-llama/Llama-3.1-70B",
        },
    )
    spec = FineTuneJobSpec.model_validate(big["spec"])
    shape = model_shape(spec)
    estimate = estimate_memory(spec, shape) if shape else None
    assert estimate is not None
    assert GPU_TYPES["a100"].memory_mib < estimate.required_mib <= GPU_TYPES["b200"].memory_mib
    assert namespace.apply(big).returncode == 0

    cond = wait_for(
        lambda: scheduled_false(namespace, "fp4", "NoCompatibleGPU"), what="NoCompatibleGPU"
    )
    message = cond["message"]
    assert message.startswith("needs compute capability ≥ 10.0 (Blackwell or newer)")
    assert "; devices: 1 × 9.0 NVIDIA H100 80GB HBM3 (81559 MiB), " in message  # newest first
    assert "2 × 8.9 NVIDIA L40S (46068 MiB)" in message
    assert "2 × 7.5 Tesla T4 (15360 MiB)" in message
    assert namespace.ftj("fp4")["status"]["phase"] == "Pending"

    cond = wait_for(
        lambda: scheduled_false(namespace, "big", "InsufficientGPUMemory"),
        what="InsufficientGPUMemory",
    )
    assert f"≥ {estimate.required_mib} MiB per GPU" in cond["message"]
    assert "compatible devices: 1 × 9.0 NVIDIA H100 80GB HBM3 (81559 MiB)" in cond["message"]
    assert "NVIDIA A100-SXM4-80GB (81920 MiB)" in cond["message"]
    assert "Tesla T4" not in cond["message"]  # not compatible with 8-bit: not listed

    def warned() -> set[str]:
        events = dra_cluster.core.list_namespaced_event(namespace.name).items
        return {e.reason for e in events if e.type == "Warning"}

    wait_for(lambda: {"NoCompatibleGPU", "InsufficientGPUMemory"} <= warned(), what="events")

    publish(dra_cluster, "dra-b200", ["b200", "b200"])
    fp4 = wait_for(lambda: allocated(namespace, "fp4"), timeout=90, what="fp4 on a B200")
    big_devices = wait_for(lambda: allocated(namespace, "big"), timeout=90, what="big on a B200")
    assert sorted(fp4 + big_devices) == ["dra-b200/gpu-0", "dra-b200/gpu-1"]
    wait_for(
        lambda: (namespace.condition("big", "Scheduled") or {}).get("status") == "True",
        what="Scheduled=True",
    )


@pytest.fixture
def capability_8_9(dra_cluster: Cluster, tmp_path: Path) -> Iterator[Namespace]:
    """A DRA operator whose admin table says bnb-8bit needs 8.9 (env, not flag), on s89-*."""
    env = dict(dra_cluster.env, FINETUNE_GPU_ALLOCATION="dra")
    cluster = Cluster(dra_cluster.root, dra_cluster.kubeconfig, dra_cluster.api, env)
    op = Operator(
        cluster, tmp_path / "op89.log", "--namespace", "s89-*", "--min-capability", "bnb-8bit=8.9"
    ).start()
    ns = make_namespace(dra_cluster, tmp_path, prefix="s89")
    try:
        yield ns
    finally:
        remove_namespace(ns)
        op.stop()


def test_capability_compares_as_versions(capability_8_9: Namespace) -> None:
    """8.9 admits 8.9, 9.0 and 10.0 and refuses 8.6 and 8.0, though both are free on a node."""
    ns = capability_8_9
    names = [f"job-{i}" for i in range(5)]
    for name in names:
        assert ns.apply(ftj_manifest(name, scheme_training("bnb-8bit"))).returncode == 0

    def placed() -> list[str] | None:
        found = [d for n in names for d in (allocated(ns, n) or [])]
        return found if len(found) == 4 else None

    given = wait_for(placed, timeout=120, what="four claims allocated")
    assert sorted(given) == sorted(compatible(ComputeCapability(8, 9)))
    assert not {"dra-mixed/gpu-0", "dra-mixed/gpu-1"} & set(given)  # 8.6 and 8.0 refused
    waiting = next(n for n in names if not allocated(ns, n))
    cond = wait_for(lambda: scheduled_false(ns, waiting), what="the extra job waits")
    assert "compute capability ≥ 8.9 (Ada Lovelace or newer)" in cond["message"]


@pytest.fixture
def device_plugin_namespace(dra_cluster: Cluster, tmp_path: Path) -> Iterator[Namespace]:
    ns = make_namespace(dra_cluster, tmp_path, prefix="dp")
    try:
        yield ns
    finally:
        remove_namespace(ns)


def test_the_same_manifest_runs_in_both_modes(
    namespace: Namespace, device_plugin_namespace: Namespace
) -> None:
    """examples/finetune.yaml, unchanged: a DRA device in one namespace, the device-plugin node
    (nvidia.com/gpu, GFD labels) in the other."""
    manifest = yaml.safe_load((REPO / "examples" / "finetune.yaml").read_text())
    name = manifest["metadata"]["name"]
    for ns in (namespace, device_plugin_namespace):
        for claim in (
            manifest["spec"]["dataset"]["claimName"],
            manifest["spec"]["output"]["claimName"],
        ):
            ns.volumes[claim] = ns.volumes["data"].parent / claim
            bind_hostpath_claim(ns.cluster.core, ns.name, claim, ns.volumes[claim])
        assert ns.apply(manifest).returncode == 0
    refs = wait_for(lambda: allocated(namespace, name), timeout=90, what="DRA allocation")
    assert DEVICES[refs[0]].capability >= ComputeCapability(8, 0)

    def dp_node() -> str | None:
        pods = device_plugin_namespace.pods(name)
        return pods[0].spec.node_name if pods and pods[0].spec.node_name else None

    assert wait_for(dp_node, timeout=90, what="device-plugin placement") == "gpu-h100-dp"
    (pod,) = device_plugin_namespace.pods(name)
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert not pod.spec.resource_claims
    for ns in (namespace, device_plugin_namespace):
        wait_for(
            lambda n=ns: n.ftj(name).get("status", {}).get("phase") == "Running",
            what=f"Running in {ns.name}",
        )
