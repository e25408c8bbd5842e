"""The pre-flight hardware check: can this machine run the resolved quantization scheme?

Runs before the model is loaded. On CUDA every visible GPU must reach the TrainerConfig's
`min_compute_capability`; a data-parallel worker then trains on its own GPU only (the one at its
local rank, see Device.for_worker). Without a GPU only the schemes with CPU kernels run: the
bitsandbytes ones (bnb-4bit, bnb-8bit) and unquantized LoRA; fp8, nvfp4 and mxfp4 need a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from finetune_api.gpu import ComputeCapability
from finetune_api.training import QuantizationScheme
from finetune_trainer.errors import InvalidInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    """One visible CUDA device."""

    index: int
    name: str
    capability: ComputeCapability


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision."""

    gpus: tuple[Gpu, ...]
    bf16: bool

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)

    @property
    def description(self) -> str:
        if not self.gpus:
            return "cpu"
        return ", ".join(f"{gpu.name} (compute capability {gpu.capability})" for gpu in self.gpus)

    def for_worker(self, local_rank: int, world_size: int) -> Device:
        """The device of one of `world_size` data-parallel workers: on CUDA, the GPU at its local
        rank only (made the current device, so nothing lands on GPU 0 by default); on CPU, the
        same CPU."""
        if not self.gpus or world_size == 1:
            return self
        check_workers(self, world_size)
        import torch

        gpu = self.gpus[local_rank]
        torch.cuda.set_device(gpu.index)
        return Device(gpus=(gpu,), bf16=self.bf16)


def runs_on_cpu(scheme: QuantizationScheme | None) -> bool:
    """True for the schemes with CPU kernels: none (plain LoRA) and the bitsandbytes ones."""
    return scheme is None or scheme.is_bitsandbytes


def scheme_label(scheme: QuantizationScheme | None) -> str:
    return "LoRA without quantization" if scheme is None else f"quantization scheme {scheme.value}"


def hardware_problem(
    scheme: QuantizationScheme | None, minimum: ComputeCapability, gpus: tuple[Gpu, ...]
) -> str | None:
    """Why these GPUs (none: CPU) cannot run `scheme`, or None when they can."""
    label = scheme_label(scheme)
    if not gpus:
        if runs_on_cpu(scheme):
            return None
        return f"{label} needs a CUDA GPU with {minimum.describe_minimum()}; no GPU is available"
    for gpu in gpus:
        if gpu.capability < minimum:
            return (
                f"{label} needs {minimum.describe_minimum()}; this GPU is {gpu.capability} "
                f"({gpu.name})"
            )
    return None


def detect_device() -> Device:
    """The visible CUDA GPUs (none on a CPU machine) and whether they all support bfloat16."""
    import torch

    if not torch.cuda.is_available():
        return Device(gpus=(), bf16=False)
    gpus = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        gpus.append(Gpu(index, torch.cuda.get_device_name(index), ComputeCapability(major, minor)))
    return Device(gpus=tuple(gpus), bf16=bool(torch.cuda.is_bf16_supported()))


def check_hardware(scheme: QuantizationScheme | None, min_capability: str) -> Device:
    """Detect the device and fail (InvalidInputError) when it cannot run `scheme`."""
    try:
        minimum = ComputeCapability.parse(min_capability)
    except ValueError as exc:
        raise InvalidInputError(f"min_compute_capability: {exc}") from None
    device = detect_device()
    problem = hardware_problem(scheme, minimum, device.gpus)
    if problem is not None:
        raise InvalidInputError(problem)
    log.info("device: %s; %s", device.description, scheme_label(scheme))
    return device


def check_workers(device: Device, world_size: int) -> None:
    """On CUDA each data-parallel worker needs a GPU of its own."""
    if device.cuda and world_size > len(device.gpus):
        raise InvalidInputError(
            f"{world_size} data-parallel workers need a GPU each; {len(device.gpus)} "
            f"{'is' if len(device.gpus) == 1 else 'are'} visible"
        )


def limit_gpu_memory(device: Device, fraction: float) -> None:
    """Apply max_vram_fraction to every GPU; nothing to do on CPU."""
    if not device.cuda:
        log.info("max_vram_fraction %s ignored: training on CPU", fraction)
        return
    if fraction <= 0:
        raise InvalidInputError(
            "spec.training.max_vram_fraction: 0 leaves no GPU memory; must be > 0"
        )
    import torch

    for gpu in device.gpus:
        torch.cuda.set_per_process_memory_fraction(fraction, gpu.index)
    log.info("max_vram_fraction %s applied to %d GPU(s)", fraction, len(device.gpus))
