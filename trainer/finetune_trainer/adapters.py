"""The LoRA adapter: lora, QLoRA or LoftQ on top of the loaded base model.

- lora: LoRA on the base model as loaded (quantized or not).
- qlora: on a bitsandbytes-quantized base, peft's `prepare_model_for_kbit_training` (frozen base,
  norms in float32, gradient checkpointing) first, then LoRA; on any other base it is plain LoRA.
- loftq: QLoRA whose LoRA matrices start from LoftQ (see loftq.py) instead of B = 0.

r = lora_r, lora_alpha = lora_alpha_over_r x lora_r, target_modules = lora_target_modules (names
matched against the ends of the model's module names; ['all-linear'] means every linear layer but
the output head), dropout LORA_DROPOUT, no bias.
"""

from __future__ import annotations

import logging
from typing import Any

from finetune_api.training import QuantizationScheme, TrainingHyperparams
from finetune_trainer.errors import InvalidInputError

log = logging.getLogger(__name__)

LORA_DROPOUT = 0.05
ALL_LINEAR = "all-linear"


def linear_layer_names(model: Any) -> list[str]:
    """The distinct short names of the model's linear layers, the output head excluded."""
    import torch

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def check_target_modules(model: Any, targets: list[str]) -> None:
    """Every target must name a layer LoRA can adapt (linear, embedding, GPT-2's Conv1D): one
    clear line listing the model's linear layers otherwise."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if targets == [ALL_LINEAR]:
        return
    adaptable = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    modules = list(model.named_modules())
    for target in targets:
        matches = [m for name, m in modules if name == target or name.endswith(f".{target}")]
        if not matches:
            problem = f"no module named {target!r} in the model"
        elif not any(isinstance(module, adaptable) for module in matches):
            problem = f"{target!r} names a {type(matches[0]).__name__}, not a linear layer"
        else:
            continue
        raise InvalidInputError(
            f"spec.training.lora_target_modules: {problem}; its linear layers are: "
            f"{', '.join(linear_layer_names(model))}"
        )


def get_peft_config(training: TrainingHyperparams) -> Any:
    """The peft LoraConfig for the hyperparameters."""
    from peft import LoraConfig

    targets = training.lora_target_modules
    return LoraConfig(
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        lora_dropout=LORA_DROPOUT,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_peft(
    model: Any,
    training: TrainingHyperparams,
    scheme: QuantizationScheme | None,
    model_dir: str,
) -> tuple[Any, dict[str, Any]]:
    """Wrap the base model with the LoRA adapter; returns the peft model and what was done."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, training.lora_target_modules)
    method = training.peft_method
    kbit = scheme is not None and scheme.is_bitsandbytes
    if method in ("qlora", "loftq") and kbit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        peft_model = get_peft_model(model, get_peft_config(training))
    except ValueError as exc:  # e.g. a target that is not a layer LoRA can adapt
        raise InvalidInputError(f"spec.training.lora_target_modules: {exc}") from None
    details: dict[str, Any] = {"method": method, "kbit_prepared": method != "lora" and kbit}
    if method == "loftq":
        from finetune_trainer.loftq import loftq_initialize

        details["loftq"] = loftq_initialize(peft_model, model_dir).summary()
    trainable, total = peft_model.get_nb_trainable_parameters()
    details["trainable_parameters"] = int(trainable)
    details["total_parameters"] = int(total)
    log.info(
        "%s adapter: r=%d alpha=%s targets=%s; %d of %d parameters train",
        method,
        training.lora_r,
        training.lora_alpha,
        ",".join(training.lora_target_modules),
        trainable,
        total,
    )
    return peft_model, details
