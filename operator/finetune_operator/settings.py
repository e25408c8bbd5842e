"""Operator settings: command-line flags, each with an environment-variable fallback.

Everything a cluster admin may want to change lives here: the trainer image, the GPU Feature
Discovery label keys, the scheme -> minimum compute capability table, default resources, and
what the operator watches.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from finetune_api.gpu import DEFAULT_MIN_CAPABILITY, ComputeCapability, parse_capability_table

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
# How training pods ask for GPUs: the device plugin's extended resource with node affinity on GPU
# Feature Discovery labels, or a ResourceClaim (Dynamic Resource Allocation, NVIDIA's DRA driver).
GpuAllocation = Literal["device-plugin", "dra"]
GPU_ALLOCATIONS: tuple[GpuAllocation, ...] = ("device-plugin", "dra")


@dataclass(frozen=True)
class GpuLabels:
    """Node label keys, as NVIDIA GPU Feature Discovery writes them."""

    compute_major: str = "nvidia.com/gpu.compute.major"
    compute_minor: str = "nvidia.com/gpu.compute.minor"
    memory_mib: str = "nvidia.com/gpu.memory"
    product: str = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class Settings:
    """The operator's configuration, resolved from flags and environment."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    gpu_allocation: GpuAllocation = "device-plugin"
    labels: GpuLabels = field(default_factory=GpuLabels)
    min_capability: dict[str, ComputeCapability] = field(
        default_factory=lambda: dict(DEFAULT_MIN_CAPABILITY)
    )
    gpu_resource: str = "nvidia.com/gpu"
    gpu_taint_key: str = "nvidia.com/gpu"
    default_cpu: str | None = None
    default_memory: str | None = None
    memory_affinity: bool = True
    status_reporting: bool = True
    progress_interval: float = 10.0
    namespaces: tuple[str, ...] = ()
    peering: str | None = None
    liveness: str | None = None
    webhook: bool = False
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 9443
    webhook_cert_dir: str | None = None
    webhook_service: str | None = None
    webhook_namespace: str | None = None
    webhook_url: str | None = None

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def dra(self) -> bool:
        return self.gpu_allocation == "dra"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"FINETUNE_{name}")
    return value if value not in (None, "") else default


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-operator",
        description=(
            "Reconcile FineTuneJob resources (finetune.dev/v1alpha1) into training Jobs placed on "
            "GPUs that can run their quantization scheme. Every flag also reads an environment "
            "variable, shown in brackets."
        ),
    )
    add = parser.add_argument
    add("--namespace", dest="namespaces", action="append", default=None,
        help="namespace to watch; repeat for several. Default: all namespaces "
             "[FINETUNE_NAMESPACES, comma-separated]")  # fmt: skip
    add("--trainer-image", default=_env("TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
        help="image for training pods when spec.image is unset [FINETUNE_TRAINER_IMAGE]")  # fmt: skip
    add("--image-pull-policy", default=_env("IMAGE_PULL_POLICY", "IfNotPresent"),
        choices=["Always", "IfNotPresent", "Never"],
        help="pull policy of training pods [FINETUNE_IMAGE_PULL_POLICY]")  # fmt: skip
    add("--min-capability", default=_env("MIN_CAPABILITY", ""),
        help="overrides of the scheme -> minimum compute capability table, e.g. "
             "'mxfp4=10.0,none=7.5'; keys: " + ", ".join(DEFAULT_MIN_CAPABILITY)
             + " ('none' = LoRA without quantization). Defaults: "
             + ", ".join(f"{k}={v}" for k, v in DEFAULT_MIN_CAPABILITY.items())
             + " [FINETUNE_MIN_CAPABILITY]")  # fmt: skip
    add("--gpu-allocation", default=_env("GPU_ALLOCATION", "device-plugin"),
        choices=GPU_ALLOCATIONS,
        help="how training pods request GPUs: 'device-plugin' (nvidia.com/gpu limits and node "
             "affinity on GPU Feature Discovery labels) or 'dra' (a ResourceClaimTemplate per job "
             "for the NVIDIA DRA driver's DeviceClass gpu.nvidia.com, with CEL selectors on "
             "compute capability and memory) [FINETUNE_GPU_ALLOCATION]")  # fmt: skip
    defaults = GpuLabels()
    add("--label-compute-major", default=_env("LABEL_COMPUTE_MAJOR", defaults.compute_major),
        help="node label with the GPU's compute capability major [FINETUNE_LABEL_COMPUTE_MAJOR]")  # fmt: skip
    add("--label-compute-minor", default=_env("LABEL_COMPUTE_MINOR", defaults.compute_minor),
        help="node label with the compute capability minor [FINETUNE_LABEL_COMPUTE_MINOR]")  # fmt: skip
    add("--label-memory", default=_env("LABEL_MEMORY", defaults.memory_mib),
        help="node label with each GPU's memory in MiB [FINETUNE_LABEL_MEMORY]")  # fmt: skip
    add("--label-product", default=_env("LABEL_PRODUCT", defaults.product),
        help="node label with the GPU product name [FINETUNE_LABEL_PRODUCT]")  # fmt: skip
    add("--gpu-resource", default=_env("GPU_RESOURCE", "nvidia.com/gpu"),
        help="extended resource name of GPUs [FINETUNE_GPU_RESOURCE]")  # fmt: skip
    add("--gpu-taint-key", default=_env("GPU_TAINT_KEY", "nvidia.com/gpu"),
        help="taint key on GPU nodes that training pods tolerate [FINETUNE_GPU_TAINT_KEY]")  # fmt: skip
    add("--default-cpu", default=_env("DEFAULT_CPU"),
        help="CPU request/limit when spec.resources.cpu is unset [FINETUNE_DEFAULT_CPU]")  # fmt: skip
    add("--default-memory", default=_env("DEFAULT_MEMORY"),
        help="memory request/limit when spec.resources.memory is unset [FINETUNE_DEFAULT_MEMORY]")  # fmt: skip
    add("--memory-affinity", type=_bool, default=_bool(_env("MEMORY_AFFINITY", "true") or "true"),
        help="require nvidia.com/gpu.memory >= the estimate when the model's size is known "
             "[FINETUNE_MEMORY_AFFINITY]")  # fmt: skip
    add("--status-reporting", type=_bool,
        default=_bool(_env("STATUS_REPORTING", "true") or "true"),
        help="live progress: training pods run as their namespace's finetune-trainer account, "
             "which an admission policy lets patch only its own FineTuneJob's status.progress "
             "[FINETUNE_STATUS_REPORTING]")  # fmt: skip
    add("--progress-interval", type=float,
        default=float(_env("PROGRESS_INTERVAL", "10") or "10"),
        help="seconds between two progress reports of a training pod "
             "[FINETUNE_PROGRESS_INTERVAL]")  # fmt: skip
    add("--peering", default=_env("PEERING"),
        help="kopf peering name for running several replicas; standalone when unset "
             "[FINETUNE_PEERING]")  # fmt: skip
    add("--liveness", default=_env("LIVENESS"),
        help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz [FINETUNE_LIVENESS]")  # fmt: skip
    add("--webhook", type=_bool, default=_bool(_env("WEBHOOK", "false") or "false"),
        help="serve the validating admission webhook and manage its "
             "ValidatingWebhookConfiguration [FINETUNE_WEBHOOK]")  # fmt: skip
    add("--webhook-host", default=_env("WEBHOOK_HOST", "0.0.0.0"),
        help="address the webhook listens on [FINETUNE_WEBHOOK_HOST]")  # fmt: skip
    add("--webhook-port", type=int, default=int(_env("WEBHOOK_PORT", "9443") or "9443"),
        help="webhook port [FINETUNE_WEBHOOK_PORT]")  # fmt: skip
    add("--webhook-cert-dir", default=_env("WEBHOOK_CERT_DIR"),
        help="directory with tls.crt and tls.key (e.g. from cert-manager); a self-signed "
             "certificate is generated when unset [FINETUNE_WEBHOOK_CERT_DIR]")  # fmt: skip
    add("--webhook-service", default=_env("WEBHOOK_SERVICE"),
        help="Service in front of the webhook; the API server calls it through this Service "
             "[FINETUNE_WEBHOOK_SERVICE]")  # fmt: skip
    add("--webhook-namespace", default=_env("WEBHOOK_NAMESPACE", os.environ.get("POD_NAMESPACE")),
        help="namespace of that Service [FINETUNE_WEBHOOK_NAMESPACE, else POD_NAMESPACE]")  # fmt: skip
    add("--webhook-url", default=_env("WEBHOOK_URL"),
        help="URL the API server calls instead of the in-cluster Service (e.g. for a local "
             "control plane) [FINETUNE_WEBHOOK_URL]")  # fmt: skip
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Resolve settings from flags and environment; exits with a usage error on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    namespaces = args.namespaces
    if namespaces is None:
        namespaces = [n.strip() for n in (_env("NAMESPACES", "") or "").split(",") if n.strip()]
    try:
        table = parse_capability_table(args.min_capability or "")
    except ValueError as exc:
        parser.error(f"--min-capability: {exc}")
    if (
        args.gpu_allocation not in GPU_ALLOCATIONS
    ):  # argparse checks choices only on the command line
        parser.error(
            f"--gpu-allocation (FINETUNE_GPU_ALLOCATION): invalid choice "
            f"{args.gpu_allocation!r} (choose from {', '.join(GPU_ALLOCATIONS)})"
        )
    if args.webhook and args.webhook_service and not args.webhook_namespace:
        parser.error("--webhook-service needs --webhook-namespace (or POD_NAMESPACE)")
    if args.webhook and not (args.webhook_service or args.webhook_url):
        parser.error("--webhook needs --webhook-service (in a cluster) or --webhook-url")
    return Settings(
        trainer_image=args.trainer_image,
        image_pull_policy=args.image_pull_policy,
        gpu_allocation=args.gpu_allocation,
        labels=GpuLabels(
            compute_major=args.label_compute_major,
            compute_minor=args.label_compute_minor,
            memory_mib=args.label_memory,
            product=args.label_product,
        ),
        min_capability=table,
        gpu_resource=args.gpu_resource,
        gpu_taint_key=args.gpu_taint_key,
        default_cpu=args.default_cpu,
        default_memory=args.default_memory,
        memory_affinity=args.memory_affinity,
        status_reporting=args.status_reporting,
        progress_interval=args.progress_interval,
        namespaces=tuple(namespaces),
        peering=args.peering,
        liveness=args.liveness,
        webhook=args.webhook,
        webhook_host=args.webhook_host,
        webhook_port=args.webhook_port,
        webhook_cert_dir=args.webhook_cert_dir,
        webhook_service=args.webhook_service,
        webhook_namespace=args.webhook_namespace,
        webhook_url=args.webhook_url,
    )
