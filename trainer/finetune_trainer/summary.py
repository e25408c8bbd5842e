"""What a completed run leaves behind: the Result, training_summary.json, the adapter files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.trainer_config import TrainerConfig
from finetune_trainer.adapters import LORA_DROPOUT, USE_RSLORA

if TYPE_CHECKING:  # pragma: no cover - typing only
    from finetune_trainer.pipeline import Prepared

log = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"


@dataclass(frozen=True)
class RunResult:
    """The numbers the termination message's Result carries."""

    steps: int
    records_seen: int
    final_loss: float | None
    eval_loss: float | None
    duration_seconds: float
    resumed_from_step: int | None = None  # the checkpoint this attempt started from


def loaded_facts(model: Any) -> dict[str, Any]:
    """How the base model was really loaded: read from the model object, not from the spec."""
    method = getattr(model, "quantization_method", None)
    quantization = None
    if method is not None:
        quantization = {
            "method": str(getattr(method, "value", method)),
            "loaded_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
            "loaded_in_8bit": bool(getattr(model, "is_loaded_in_8bit", False)),
        }
    return {
        "quantization": quantization,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def summarize(
    config: TrainerConfig, ready: Prepared, result: RunResult, facts: dict[str, Any]
) -> dict[str, Any]:
    """training_summary.json: the outcome, and every value the run resolved."""
    training, plan = config.spec.training, ready.plan
    scheme = training.resolved_quantization_scheme
    resume, device = facts["resumed_from"], facts["device"]
    return {
        "model": ready.model.name,
        "model_type": getattr(ready.model_config, "model_type", None),
        "steps": result.steps,
        "records_seen": result.records_seen,
        "epochs": round(result.records_seen / plan.train_records, 4),
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "duration_seconds": result.duration_seconds,
        "resumed_from": Path(resume).name if resume else None,
        "device": device.description,
        "world_size": plan.world_size,
        "global_batch_size": plan.global_batch_size,
        "precision": "bf16" if device.bf16 else "fp32",
        "resolved": {
            **plan.as_dict(),
            "batch_size": training.batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "weight_decay": training.weight_decay,
            "lr_scheduler": training.lr_scheduler,
            "validation_steps": training.validation_steps if plan.validation_records else None,
            "max_sequence_length": config.spec.dataset.max_sequence_length,
            "quantization_scheme": scheme.value if scheme else None,
            "quantization": facts["quantization"],
            "peft": facts["peft"],
            "lora": {
                "r": training.lora_r,
                "alpha": training.lora_alpha,
                "target_modules": training.lora_target_modules,
                "dropout": LORA_DROPOUT,
                "use_rslora": USE_RSLORA,
            },
            "rope_scaling_factor": ready.rope_factor,
            "rope_parameters": getattr(ready.model_config, "rope_parameters", None),
            "max_position_embeddings": getattr(ready.model_config, "max_position_embeddings", None),
            "attn_implementation": facts["attn_implementation"],
        },
    }


def save_outputs(output: str, model: Any, tokenizer: Any, summary: dict[str, Any]) -> None:
    """The adapter (adapter_model.safetensors + adapter_config.json), the tokenizer, the summary."""
    directory = Path(output)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    (directory / SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    log.info("adapter, tokenizer and %s written to %s", SUMMARY_FILE, output)
