"""The LoRA adapter: lora, QLoRA or LoftQ on top of the loaded base model.

Which one is decided as Safe Synthesizer decides it (TrainingHyperparams.peft_method):
- lora: quantize_model false, whatever peft_implementation says: LoRA on the base as loaded.
- qlora: quantize_model true: on a bitsandbytes-quantized base, peft's
  `prepare_model_for_kbit_training` (frozen base, norms in float32, gradient checkpointing) first,
  then LoRA; on the other schemes plain LoRA on the quantized base.
- loftq: quantize_model true and peft_implementation exactly 'loftq' (a bitsandbytes scheme, the
  model refuses others): QLoRA whose LoRA matrices start from LoftQ (see loftq.py).

r = lora_r, lora_alpha = int(lora_alpha_over_r x lora_r) as Safe Synthesizer computes it,
target_modules = lora_target_modules (names matched against the ends of the model's module names;
['all-linear'] means every linear layer but the output head), dropout LORA_DROPOUT, no bias.
Like peft, a target that matches nothing is skipped (with a warning) as long as another matches.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

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
    """The targets must match at least one module, and each match must be a layer LoRA can adapt
    (linear, embedding, GPT-2's Conv1D), where peft would fail otherwise: one clear line listing
    the model's linear layers. A target that matches nothing while another does is skipped by
    peft, as in Safe Synthesizer: a warning names it."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if targets == [ALL_LINEAR]:
        return
    adaptable = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    modules = [(name, module) for name, module in model.named_modules() if name]
    unmatched = []
    for target in targets:
        matches = [m for name, m in modules if name == target or name.endswith(f".{target}")]
        if not matches:
            unmatched.append(target)
        elif not any(isinstance(module, adaptable) for module in matches):
            _bad_targets(
                model, f"{target!r} names a {type(matches[0]).__name__}, not a linear layer"
            )
    if len(unmatched) == len(targets):
        names = ", ".join(repr(t) for t in unmatched)
        _bad_targets(model, f"no module named {names} in the model")
    if unmatched:
        log.warning(
            "spec.training.lora_target_modules: no module named %s in the model; skipped",
            ", ".join(repr(t) for t in unmatched),
        )


def _bad_targets(model: Any, problem: str) -> NoReturn:
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
    if method != "lora" and kbit:
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
