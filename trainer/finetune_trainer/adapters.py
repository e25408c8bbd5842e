"""The LoRA adapter on the loaded base model, set up as Safe Synthesizer's HuggingFace backend
(nemo_safe_synthesizer.training.huggingface_backend, `maybe_quantize`) sets it up.

The base (TrainingHyperparams.peft_method decides, as Safe Synthesizer does):
- lora (quantize_model false, whatever peft_implementation says): gradient checkpointing on
  (transformers' default, non-reentrant), inputs that require grad (so the gradient reaches the
  adapters through checkpointed frozen layers), no KV cache.
- qlora and loftq (quantize_model true, any scheme): peft's `prepare_model_for_kbit_training`
  with gradient checkpointing: base frozen, its unquantized bf16/fp16 weights upcast to float32
  (except on torchao-quantized models, nvfp4), checkpointing on a bitsandbytes base.
The Trainer turns gradient checkpointing on (again) in every case (TrainingArguments), so every
run ends up with non-reentrant checkpointing on every decoder layer, as Safe Synthesizer's does.

The LoraConfig: r = lora_r, lora_alpha = int(lora_alpha_over_r x lora_r) as Safe Synthesizer
computes it, rank-stabilised scaling (use_rslora: alpha / sqrt(r), Safe Synthesizer's fixed
runtime choice), target_modules = lora_target_modules (names matched against the ends of the
model's module names; ['all-linear'] means every linear layer but the output head), and peft's
defaults for the rest, as Safe Synthesizer leaves them: dropout 0, no bias, the usual
initialisation (Kaiming A, zero B).

loftq: Safe Synthesizer 0.1.16 adds LoftQConfig(loftq_bits=the scheme's bits) but keeps
init_lora_weights=True, so peft drops it (loftq_config {} in adapter_config.json, and a warning):
the run is QLoRA, and so is ours, with a warning that says so. The adapter starts at zero (exactly
the base model) and so stays usable on an unquantized base, as Safe Synthesizer's are.

Like peft, a target that matches nothing is skipped (with a warning) as long as another matches.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from finetune_api.training import SAFE_SYNTHESIZER_VERSION, TrainingHyperparams
from finetune_trainer.errors import InvalidInputError

log = logging.getLogger(__name__)

LORA_DROPOUT = 0.0  # peft's default, which Safe Synthesizer keeps
USE_RSLORA = True  # Safe Synthesizer's FIXED_RUNTIME_LORA_ARGS
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
    """The peft LoraConfig for the hyperparameters (see the module docstring)."""
    from peft import LoraConfig

    targets = training.lora_target_modules
    if training.peft_method == "loftq":
        log.warning(
            "peft_implementation loftq trains QLoRA, as in Safe Synthesizer %s: peft drops the "
            "LoftQConfig it passes, since init_lora_weights stays True",
            SAFE_SYNTHESIZER_VERSION,
        )
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        use_rslora=USE_RSLORA,
        lora_dropout=LORA_DROPOUT,
        bias="none",
        init_lora_weights=True,
    )


def prepare_base(model: Any, quantized: bool) -> Any:
    """Gradient checkpointing and frozen weights as Safe Synthesizer prepares the base."""
    from peft import prepare_model_for_kbit_training

    if not quantized:
        # Safe Synthesizer calls gradient_checkpointing_enable(), transformers' deprecated alias
        # of this (the same call: default kwargs, i.e. use_reentrant=False)
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
        model.config.use_cache = False
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def apply_peft(
    model: Any,
    training: TrainingHyperparams,
) -> tuple[Any, dict[str, Any]]:
    """Wrap the base model with the LoRA adapter; returns the peft model and what was done."""
    from peft import get_peft_model

    check_target_modules(model, training.lora_target_modules)
    method = training.peft_method
    quantized = method != "lora"
    model = prepare_base(model, quantized)
    try:
        peft_model = get_peft_model(model, get_peft_config(training))
    except ValueError as exc:  # e.g. a target that is not a layer LoRA can adapt
        raise InvalidInputError(f"spec.training.lora_target_modules: {exc}") from None
    details: dict[str, Any] = {
        "method": method,
        "kbit_prepared": quantized,
        "use_rslora": USE_RSLORA,
        "lora_dropout": LORA_DROPOUT,
    }
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
