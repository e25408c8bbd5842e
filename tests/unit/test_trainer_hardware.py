"""The pre-flight hardware check: which scheme runs where, and the one-line refusals."""

from __future__ import annotations

import pytest

from finetune_api import ComputeCapability, QuantizationScheme
from finetune_api.gpu import DEFAULT_MIN_CAPABILITY, scheme_key
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.hardware import (
    Device,
    Gpu,
    check_hardware,
    detect_device,
    hardware_problem,
    limit_gpu_memory,
)

A100 = Gpu(0, "NVIDIA A100-SXM4-80GB", ComputeCapability(8, 0))
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", ComputeCapability(9, 0))
T4 = Gpu(0, "Tesla T4", ComputeCapability(7, 5))
B200 = Gpu(0, "NVIDIA B200", ComputeCapability(10, 0))

FP8_NEEDS = ComputeCapability(9, 0).describe_minimum()  # "compute capability >= 9.0 (Hopper ...)"
SCHEMES: list[QuantizationScheme | None] = [None, *QuantizationScheme]


def minimum(scheme: QuantizationScheme | None) -> ComputeCapability:
    return DEFAULT_MIN_CAPABILITY[scheme_key(scheme)]


def test_fp8_on_an_a100_names_the_requirement_and_the_gpu() -> None:
    problem = hardware_problem(QuantizationScheme.FP8, minimum(QuantizationScheme.FP8), (A100,))
    assert problem == (
        f"quantization scheme fp8 needs {FP8_NEEDS}; this GPU is 8.0 (NVIDIA A100-SXM4-80GB)"
    )
    assert "9.0 (Hopper or newer)" in FP8_NEEDS


@pytest.mark.parametrize(
    ("scheme", "needs"),
    [
        (QuantizationScheme.FP8, "9.0 (Hopper or newer)"),
        (QuantizationScheme.NVFP4, "10.0 (Blackwell or newer)"),
        (QuantizationScheme.MXFP4, "9.0 (Hopper or newer)"),
    ],
)
def test_gpu_only_schemes_refuse_the_cpu(scheme: QuantizationScheme, needs: str) -> None:
    requirement = minimum(scheme).describe_minimum()
    assert requirement.endswith(needs)
    assert hardware_problem(scheme, minimum(scheme), ()) == (
        f"quantization scheme {scheme.value} needs a CUDA GPU with {requirement}; "
        "no GPU is available"
    )


@pytest.mark.parametrize("scheme", [None, QuantizationScheme.BNB_4BIT, QuantizationScheme.BNB_8BIT])
def test_bitsandbytes_and_plain_lora_run_on_cpu(scheme: QuantizationScheme | None) -> None:
    assert hardware_problem(scheme, minimum(scheme), ()) is None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_on_each_generation(scheme: QuantizationScheme | None) -> None:
    need = minimum(scheme)
    for gpu in (T4, A100, H100, B200):
        problem = hardware_problem(scheme, need, (gpu,))
        assert (problem is None) == (gpu.capability >= need), (scheme, gpu)


def test_unquantized_lora_on_a_turing_gpu() -> None:
    assert hardware_problem(None, minimum(None), (T4,)) == (
        f"LoRA without quantization needs {ComputeCapability(8, 0).describe_minimum()}; "
        "this GPU is 7.5 (Tesla T4)"
    )


def test_every_visible_gpu_must_qualify() -> None:
    problem = hardware_problem(QuantizationScheme.FP8, ComputeCapability(9, 0), (H100, A100))
    assert problem is not None
    assert "NVIDIA A100" in problem


def test_check_hardware_on_this_machine() -> None:
    """The real detection: a CPU machine runs bnb-4bit and refuses fp8 with one line."""
    device = detect_device()
    if device.cuda:
        pytest.skip("this test describes a machine without a GPU")
    assert check_hardware(QuantizationScheme.BNB_4BIT, "8.0").cuda is False
    with pytest.raises(InvalidInputError) as refused:
        check_hardware(QuantizationScheme.FP8, "9.0")
    assert refused.value.exit_code == 2
    assert str(refused.value) == (
        f"quantization scheme fp8 needs a CUDA GPU with {FP8_NEEDS}; no GPU is available"
    )


def test_invalid_minimum_is_invalid_input() -> None:
    with pytest.raises(
        InvalidInputError, match=r"^min_compute_capability: invalid compute capability"
    ):
        check_hardware(None, "nine")


def test_max_vram_fraction() -> None:
    cpu = Device(gpus=(), bf16=False)
    limit_gpu_memory(cpu, 0.0)  # nothing to limit on CPU
    with pytest.raises(InvalidInputError, match=r"max_vram_fraction: 0 leaves no GPU memory"):
        limit_gpu_memory(Device(gpus=(H100,), bf16=True), 0.0)
