"""LoftQ initialisation of the LoRA matrices of a bitsandbytes-quantized model.

LoftQ (https://huggingface.co/papers/2310.08659) starts the adapter from the quantization error
instead of from zero: for each adapted layer with original weight W and quantized weight Q, the
rank-r truncated SVD of the residual W - dequantize(Q) gives B·A, so that
dequantize(Q) + scaling·B·A is the best rank-r correction of the quantized layer.

This is what peft's `replace_lora_weights_loftq` does for a model loaded in 4 bits (the route peft
recommends for pre-quantized models). That function, like peft's `LoftQConfig` path, computes on
CUDA unconditionally; this one computes on the device the weights are on (so it also runs on
CPU), handles 8-bit (LLM.int8) weights too, and divides by the LoRA scaling (alpha / r), which
peft leaves out: with alpha = r both are the same.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.errors import InvalidInputError

log = logging.getLogger(__name__)

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoftqReport:
    """Per-layer quantization error (Frobenius norm) before and after the LoftQ correction."""

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        before = [b for b, _ in self.errors.values()]
        after = [a for _, a in self.errors.values()]
        return {
            "layers": len(self.errors),
            "mean_error_before": sum(before) / len(before) if before else None,
            "mean_error_after": sum(after) / len(after) if after else None,
        }


class SafetensorsWeights:
    """Reads single tensors from a model directory's (possibly sharded) safetensors files."""

    def __init__(self, model_dir: str) -> None:
        directory = Path(model_dir)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if single.is_file():
            self._files: dict[str, Path] | None = None
            self._single: Path | None = single
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self._files = {name: directory / file for name, file in weight_map.items()}
            self._single = None
        else:
            raise InvalidInputError(
                f"peft_implementation loftq: {model_dir} has neither model.safetensors nor "
                "model.safetensors.index.json to read the original weights from"
            )

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        file = self._single if self._files is None else self._files.get(name)
        if file is None:
            raise KeyError(name)
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            if name not in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                raise KeyError(name)
            return handle.get_tensor(name)


def dequantize(layer: Any) -> Any:
    """The float32 weight of a bitsandbytes Linear4bit or Linear8bitLt layer."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    raise InvalidInputError(
        f"peft_implementation loftq needs a bitsandbytes-quantized layer, got {type(layer).__name__}"
    )


def loftq_initialize(peft_model: Any, model_dir: str) -> LoftqReport:
    """Replace the LoRA matrices of every adapted layer with the LoftQ initialisation."""
    import torch
    from peft.tuners.lora import LoraLayer

    weights = SafetensorsWeights(model_dir)
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "")
    report = LoftqReport()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
                continue
            short = name.removeprefix(PEFT_PREFIX)
            original = _original_weight(weights, short, prefix).float()
            quantized = dequantize(module.get_base_layer())
            original = original.to(quantized.device)
            residual = original - quantized
            rank, scaling = module.r[ADAPTER], module.scaling[ADAPTER]
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            root = torch.sqrt(s[:rank]) / math.sqrt(scaling)
            lora_b = u[:, :rank] * root
            lora_a = root[:, None] * vh[:rank]
            a_weight = module.lora_A[ADAPTER].weight
            b_weight = module.lora_B[ADAPTER].weight
            a_weight.data = lora_a.to(a_weight.device, a_weight.dtype)
            b_weight.data = lora_b.to(b_weight.device, b_weight.dtype)
            corrected = quantized + scaling * (lora_b @ lora_a)
            report.errors[short] = (
                float(torch.linalg.norm(residual)),
                float(torch.linalg.norm(original - corrected)),
            )
    if not report.errors:
        raise InvalidInputError("peft_implementation loftq: no LoRA layer to initialise")
    summary = report.summary()
    log.info(
        "LoftQ initialised %d layers: mean quantization error %.4g -> %.4g",
        summary["layers"],
        summary["mean_error_before"],
        summary["mean_error_after"],
    )
    return report


def _original_weight(weights: SafetensorsWeights, module_name: str, prefix: str) -> Any:
    candidates = [f"{module_name}.weight"]
    if prefix and module_name.startswith(f"{prefix}."):
        candidates.append(f"{module_name.removeprefix(prefix + '.')}.weight")
    for candidate in candidates:
        try:
            return weights.get(candidate)
        except KeyError:
            continue
    raise InvalidInputError(
        f"peft_implementation loftq: weight {candidates[0]!r} is not in the model's safetensors files"
    )
