"""GPU generations and which quantization scheme each can run. Pure data, no heavy imports.

Shared by the operator (node affinity on GPU Feature Discovery labels) and the trainer (the
pre-flight check against the GPU it actually got).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Self

from finetune_api.training import QuantizationScheme

_CAPABILITY = re.compile(r"^\s*(\d+)\.(\d+)\s*$")

# Compute capability (major, minor) -> NVIDIA architecture name, for messages and status.
_ARCHITECTURES: tuple[tuple[tuple[int, int], str], ...] = (
    ((12, 0), "Blackwell"),
    ((10, 0), "Blackwell"),
    ((9, 0), "Hopper"),
    ((8, 9), "Ada Lovelace"),
    ((8, 0), "Ampere"),
    ((7, 5), "Turing"),
    ((7, 0), "Volta"),
    ((6, 0), "Pascal"),
)

# Key used in the scheme table for LoRA without quantization (quantize_model: false).
UNQUANTIZED = "none"


@dataclass(frozen=True, order=True)
class ComputeCapability:
    """A CUDA compute capability such as 8.9; compares as the (major, minor) pair."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse "MAJOR.MINOR" (e.g. "9.0"); raises ValueError naming the text otherwise."""
        match = _CAPABILITY.match(text)
        if match is None:
            raise ValueError(f"invalid compute capability {text!r}: expected MAJOR.MINOR, e.g. 8.0")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def architecture(self) -> str:
        """The NVIDIA architecture this capability belongs to (the newest one at or below it)."""
        for floor, name in _ARCHITECTURES:
            if (self.major, self.minor) >= floor:
                return name
        return "pre-Pascal"

    def describe_minimum(self) -> str:
        """E.g. "compute capability ≥ 9.0 (Hopper or newer)"."""
        return f"compute capability ≥ {self} ({self.architecture} or newer)"


# The documented defaults; the cluster admin can override them in the operator's settings.
DEFAULT_MIN_CAPABILITY: dict[str, ComputeCapability] = {
    QuantizationScheme.BNB_4BIT.value: ComputeCapability(8, 0),  # bitsandbytes: Ampere
    QuantizationScheme.BNB_8BIT.value: ComputeCapability(8, 0),
    QuantizationScheme.FP8.value: ComputeCapability(9, 0),  # FP8 tensor cores: Hopper
    QuantizationScheme.NVFP4.value: ComputeCapability(10, 0),  # FP4 tensor cores: Blackwell
    QuantizationScheme.MXFP4.value: ComputeCapability(9, 0),  # triton MXFP4 kernels: Hopper
    UNQUANTIZED: ComputeCapability(8, 0),  # bfloat16 LoRA: Ampere
}


def scheme_key(scheme: QuantizationScheme | None) -> str:
    """The capability-table key for a resolved scheme (None means unquantized LoRA)."""
    return UNQUANTIZED if scheme is None else scheme.value


def parse_capability_table(text: str) -> dict[str, ComputeCapability]:
    """Parse "bnb-4bit=8.0,fp8=9.0" overrides on top of the defaults; unknown keys are errors."""
    table = dict(DEFAULT_MIN_CAPABILITY)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in table:
            known = ", ".join(table)
            raise ValueError(
                f"invalid scheme capability entry {item!r}: expected KEY=MAJOR.MINOR, KEY in {known}"
            )
        table[key] = ComputeCapability.parse(value)
    return table
