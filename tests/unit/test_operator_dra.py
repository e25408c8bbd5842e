"""DRA mode without a cluster: the ResourceClaimTemplate, the pod that uses it, the settings, and the
reading of ResourceSlices and ResourceClaims (the CEL itself is proven by tests/integration/test_dra.py
against the real API server and scheduler)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from finetune_api import ComputeCapability
from finetune_api.resource import FineTuneJobSpec, FineTuneJobStatus
from finetune_operator import builders, dra
from finetune_operator.builders import JobIdentity
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import GpuRequirement, diagnose_unschedulable, gpu_requirement
from finetune_operator.settings import Settings, parse_settings
from finetune_operator.status import Observation, derive
from gpusim import GPU_TYPES, gpu_device
from podsecurity import restricted_violations

JOB = JobIdentity(name="llama-sft", namespace="ml", uid="0000-1111", generation=3)
SERIALIZE = ApiClient().sanitize_for_serialization
DRA = Settings(gpu_allocation="dra")


def spec(**extra: Any) -> FineTuneJobSpec:
    body: dict[str, Any] = {
        "dataset": {"claimName": "data", "path": "sets/train.jsonl"},
        "output": {"claimName": "adapters", "path": "llama-sft"},
        "training": {"quantize_model": True, "quantization_scheme": "fp8"},
    }
    body.update(extra)
    return FineTuneJobSpec.model_validate(body)


def template(s: FineTuneJobSpec, settings: Settings = DRA) -> dict[str, Any]:
    built = builders.build_resource_claim_template(JOB, s, gpu_requirement(s, settings))
    result: dict[str, Any] = SERIALIZE(built)
    return result


def test_claim_template_asks_the_nvidia_device_class_for_capable_gpus() -> None:
    training = {
        "pretrained_model": "acme/unknown",
        "quantize_model": True,
        "quantization_scheme": "fp8",
    }
    t = template(spec(resources={"gpus": 2}, training=training))
    assert (t["apiVersion"], t["kind"]) == ("resource.k8s.io/v1", "ResourceClaimTemplate")
    assert t["metadata"]["name"] == "llama-sft-gpus"
    (owner,) = t["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", "0000-1111", True)
    (request,) = t["spec"]["spec"]["devices"]["requests"]
    assert request["name"] == "gpus"
    exactly = request["exactly"]
    assert exactly["deviceClassName"] == "gpu.nvidia.com"
    assert (exactly["allocationMode"], exactly["count"]) == ("ExactCount", 2)
    assert [s["cel"]["expression"] for s in exactly["selectors"]] == [
        "device.attributes['gpu.nvidia.com'].cudaComputeCapability.compareTo(semver('9.0.0')) >= 0"
    ]  # an unknown model: no memory selector
    claim_meta = t["spec"]["metadata"]
    assert claim_meta["labels"][builders.LABEL_UID] == "0000-1111"


def test_memory_selector_when_the_model_size_is_known_and_enforced() -> None:
    s = spec(training={"pretrained_model": "meta-llama/Llama-3.1-8B", "quantize_model": False})
    requirement = gpu_requirement(s, DRA)
    assert requirement.min_memory_mib is not None
    (request,) = template(s)["spec"]["spec"]["devices"]["requests"]
    assert [x["cel"]["expression"] for x in request["exactly"]["selectors"]] == [
        "device.attributes['gpu.nvidia.com'].cudaComputeCapability.compareTo(semver('8.0.0')) >= 0",
        "device.capacity['gpu.nvidia.com'].memory"
        f".compareTo(quantity('{requirement.min_memory_mib}Mi')) >= 0",
    ]
    off = Settings(gpu_allocation="dra", memory_affinity=False)
    (request,) = template(s, off)["spec"]["spec"]["devices"]["requests"]
    assert len(request["exactly"]["selectors"]) == 1


@pytest.mark.parametrize(("minimum", "version"), [("8.9", "8.9.0"), ("10.0", "10.0.0")])
def test_capability_selector_writes_a_full_semver(minimum: str, version: str) -> None:
    assert f"semver('{version}')" in dra.capability_selector(ComputeCapability.parse(minimum))


def test_dra_pod_uses_the_claim_instead_of_the_device_plugin() -> None:
    s = spec(resources={"gpus": 2, "cpu": "8", "memory": "64Gi"})
    job = SERIALIZE(builders.build_job(JOB, s, gpu_requirement(s, DRA), DRA))
    pod = job["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [
        {"name": "gpus", "resourceClaimTemplateName": "llama-sft-gpus"}
    ]
    container = pod["containers"][0]
    assert container["resources"]["claims"] == [{"name": "gpus"}]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "64Gi"}
    assert "affinity" not in pod  # the allocation decides the node
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert restricted_violations(pod) == []
    # device-plugin mode is unchanged: no claim, the extended resource and the affinity
    plugin = SERIALIZE(builders.build_job(JOB, s, gpu_requirement(s, Settings()), Settings()))
    plugin_pod = plugin["spec"]["template"]["spec"]
    assert "resourceClaims" not in plugin_pod and "affinity" in plugin_pod
    assert plugin_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "claims" not in plugin_pod["containers"][0]["resources"]


def test_without_cpu_and_memory_the_dra_container_has_only_the_claim() -> None:
    s = spec()
    job = SERIALIZE(builders.build_job(JOB, s, gpu_requirement(s, DRA), DRA))
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"claims": [{"name": "gpus"}]}


def test_setting_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings([]).gpu_allocation == "device-plugin"
    assert parse_settings(["--gpu-allocation", "dra"]).dra
    monkeypatch.setenv("FINETUNE_GPU_ALLOCATION", "dra")
    assert parse_settings([]).gpu_allocation == "dra"
    monkeypatch.setenv("FINETUNE_GPU_ALLOCATION", "gpu-operator")
    with pytest.raises(SystemExit):
        parse_settings([])


def test_setting_errors_name_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FINETUNE_GPU_ALLOCATION", "nope")
    with pytest.raises(SystemExit):
        parse_settings([])
    assert "--gpu-allocation (FINETUNE_GPU_ALLOCATION): invalid choice 'nope'" in (
        capsys.readouterr().err
    )


def slice_of(node: str, keys: list[str], driver: str = dra.DRIVER) -> dict[str, Any]:
    """A ResourceSlice as the API server returns it (capacity canonicalized to binary SI)."""
    devices = [gpu_device(GPU_TYPES[k], i, node) for i, k in enumerate(keys)]
    for device in devices:
        mib = int(device["capacity"]["memory"]["value"]) // (1024 * 1024)
        device["capacity"]["memory"]["value"] = f"{mib}Mi"
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{driver}-x7k2p"},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def test_gpus_in_slices_read_the_drivers_attributes() -> None:
    mixed = slice_of("n1", ["a10", "a100"])
    mig = {"name": "gpu-0-mig-9-4-4", "attributes": {"type": {"string": "mig"}}}
    mixed["spec"]["devices"].append(mig)
    other = slice_of("n2", ["h100"], driver="gpu.example.com")
    found = dra.gpus_in_slices([mixed, other])
    assert [(d.ref, str(d.capability), d.memory_mib, d.product, d.node) for d in found] == [
        ("n1/gpu-0", "8.6", 23028, "NVIDIA A10", "n1"),
        ("n1/gpu-1", "8.0", 81920, "NVIDIA A100-SXM4-80GB", "n1"),
    ]


def test_qualified_attribute_names_and_plain_byte_quantities() -> None:
    device = {
        "name": "gpu-3",
        "attributes": {
            "gpu.nvidia.com/type": {"string": "gpu"},
            "gpu.nvidia.com/cudaComputeCapability": {"version": "12.0.0"},
            "gpu.nvidia.com/productName": {"string": "NVIDIA RTX PRO 6000"},
        },
        "capacity": {"gpu.nvidia.com/memory": {"value": str(97887 * 1024 * 1024)}},
    }
    body = {"spec": {"driver": "gpu.nvidia.com", "pool": {"name": "p"}, "devices": [device]}}
    (gpu,) = dra.gpus_in_slice(body)
    assert (gpu.capability, gpu.memory_mib) == (ComputeCapability(12, 0), 97887)
    junk = {"name": "gpu-4", "attributes": {"type": {"string": "gpu"}}}
    (bare,) = dra.gpus_in_slice({"spec": {"driver": "gpu.nvidia.com", "devices": [junk]}})
    assert (bare.capability, bare.memory_mib, bare.product) == (None, None, "unknown GPU")


def claim(results: list[dict[str, str]] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "llama-sft-train-abcde-gpus-q8z2m"}, "status": {}}
    if results is not None:
        body["status"] = {"allocation": {"devices": {"results": results}}}
    return body


def test_allocation_names_devices_and_takes_product_from_the_slice() -> None:
    offered = dra.gpus_in_slices([slice_of("n1", ["a10", "a100"])])
    result = {"request": "gpus", "driver": "gpu.nvidia.com", "pool": "n1", "device": "gpu-1"}
    found = dra.allocation(claim([result]), offered)
    assert found is not None
    assert found.claim == "llama-sft-train-abcde-gpus-q8z2m"
    assert found.refs == ["n1/gpu-1"]
    summary = found.summary("n1")
    assert (summary.name, summary.product, str(summary.capability)) == (
        "n1", "NVIDIA A100-SXM4-80GB", "8.0",
    )  # fmt: skip
    assert dra.allocation(claim(None), offered) is None
    gone = dra.allocation(claim([{**result, "device": "gpu-7"}]), offered)
    assert (
        gone is not None
        and gone.refs == ["n1/gpu-7"]
        and gone.devices[0].product == ("unknown GPU")
    )


def test_dra_diagnosis_lists_what_the_slices_offer() -> None:
    offered = dra.gpus_in_slices(
        [slice_of("n1", ["t4", "t4"]), slice_of("n2", ["h100"]), slice_of("n3", ["l40s"])]
    )
    gpus = [d.as_gpu() for d in offered]
    nvfp4 = GpuRequirement("nvfp4", ComputeCapability(10, 0), None, True)
    d = diagnose_unschedulable(nvfp4, gpus, "0/3 nodes", noun="devices", none=dra.NO_DEVICES)
    assert d.reason == "NoCompatibleGPU"
    assert d.message == (
        "needs compute capability ≥ 10.0 (Blackwell or newer); devices: "
        "1 × 9.0 NVIDIA H100 80GB HBM3 (81559 MiB), 1 × 8.9 NVIDIA L40S (46068 MiB), "
        "2 × 7.5 Tesla T4 (15360 MiB)"
    )
    empty = diagnose_unschedulable(nvfp4, [], "x", noun="devices", none=dra.NO_DEVICES)
    assert empty.message.endswith(
        "devices: no GPUs of the NVIDIA DRA driver (gpu.nvidia.com) in the cluster's ResourceSlices"
    )


def test_status_records_the_claim_and_devices() -> None:
    offered = dra.gpus_in_slices([slice_of("n1", ["h100", "h100"])])
    results = [
        {"request": "gpus", "driver": "gpu.nvidia.com", "pool": "n1", "device": f"gpu-{i}"}
        for i in range(2)
    ]
    found = dra.allocation(claim(results), offered)
    assert found is not None
    running = PodView(
        "p1", "2026-01-01T00:00:00Z", "n1", "Running", None, "2026-01-01T00:00:05Z", None, None,
        None, claims=("llama-sft-train-abcde-gpus-q8z2m",),
    )  # fmt: skip
    job = JobView("j-train", "h", 1, 1, 0, 0, None, None, None, None)
    observation = Observation(
        generation=1,
        now="2026-01-01T00:00:10Z",
        requirement=GpuRequirement("fp8", ComputeCapability(9, 0), None, True),
        job=job,
        pods=(running,),
        node=found.summary("n1"),
        allocation=found,
    )
    status, _ = derive(FineTuneJobStatus(), observation)
    placement = status.placement
    assert placement is not None
    assert placement.gpu_devices == ["n1/gpu-0", "n1/gpu-1"]
    assert placement.resource_claim == "llama-sft-train-abcde-gpus-q8z2m"
    assert (placement.gpu_product, placement.node_compute_capability) == (
        "NVIDIA H100 80GB HBM3", "9.0",
    )  # fmt: skip
    scheduled = next(c for c in status.conditions if c.type == "Scheduled")
    assert scheduled.message == (
        "bound to node n1 (9.0 NVIDIA H100 80GB HBM3), devices n1/gpu-0, n1/gpu-1 "
        "(claim llama-sft-train-abcde-gpus-q8z2m)"
    )
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["placement"]["gpuDevices"] == ["n1/gpu-0", "n1/gpu-1"]
    # the pod finished and its claim was deallocated: what was seen stays
    done = PodView(
        "p1", "2026-01-01T00:00:00Z", "n1", "Succeeded", None, "2026-01-01T00:00:05Z",
        "2026-01-01T00:01:00Z", 0, None, claims=("llama-sft-train-abcde-gpus-q8z2m",),
    )  # fmt: skip
    finished, _ = derive(
        status,
        Observation(
            generation=1, now="t2", requirement=observation.requirement, job=job, pods=(done,)
        ),
    )
    assert finished.placement is not None
    assert finished.placement.gpu_devices == ["n1/gpu-0", "n1/gpu-1"]
    assert finished.placement.gpu_product == "NVIDIA H100 80GB HBM3"
    assert finished.placement.resource_claim == placement.resource_claim
    # the pod is gone (e.g. finished and cleaned up): the placement is kept
    later, _ = derive(
        status, Observation(generation=1, now="t", requirement=observation.requirement, job=job)
    )
    assert later.placement is not None and later.placement.gpu_devices == placement.gpu_devices


def test_pod_view_reads_the_claims_kubernetes_made() -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {"containers": []},
        "status": {
            "phase": "Pending",
            "resourceClaimStatuses": [
                {"name": "gpus", "resourceClaimName": "p-gpus-x1"},
                {"name": "none"},
            ],
        },
    }
    assert PodView.from_api(pod).claims == ("p-gpus-x1",)


def test_example_manifest_builds_in_both_modes() -> None:
    """The same FineTuneJob: a claim template and a claim-using pod, or GPU limits and affinity."""
    from pathlib import Path

    manifest = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples" / "finetune.yaml").read_text()
    )
    s = FineTuneJobSpec.model_validate(manifest["spec"])
    for settings in (Settings(), DRA):
        job = SERIALIZE(builders.build_job(JOB, s, gpu_requirement(s, settings), settings))
        assert restricted_violations(job["spec"]["template"]["spec"]) == []
    assert template(s)["spec"]["spec"]["devices"]["requests"][0]["exactly"]["count"] == 1
