"""The trainer's fixed choices against the pinned Safe Synthesizer's HuggingFace backend
(`nemo_safe_synthesizer/training/huggingface_backend.py`), read from its source: the module
imports wandb and its whole training stack, so it is parsed, not imported. A release that changes
the TrainingArguments it fixes, the LoraConfig it builds or how it prepares the base fails here,
and the trainer then follows it or README.md lists the difference."""

from __future__ import annotations

import ast
from importlib import util
from pathlib import Path
from typing import Any

import pytest

from finetune_api import TrainingHyperparams
from finetune_trainer import adapters, training
from finetune_trainer.hardware import Device
from finetune_trainer.plan import make_plan


@pytest.fixture(scope="module")
def backend() -> ast.Module:
    found = util.find_spec("nemo_safe_synthesizer")
    assert found is not None and found.submodule_search_locations
    path = Path(found.submodule_search_locations[0]) / "training" / "huggingface_backend.py"
    return ast.parse(path.read_text(encoding="utf-8"))


def module_dict(tree: ast.Module, name: str) -> dict[str, ast.expr]:
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == [name]
            and isinstance(node.value, ast.Dict)
        ):
            keys = [ast.literal_eval(k) for k in node.value.keys if k is not None]
            return dict(zip(keys, node.value.values, strict=True))
    raise AssertionError(f"{name} is not a dict literal in the backend any more")


def method(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"the backend has no method {name}")


def calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Calls of a function or method called `name` under `node`."""
    return [
        call
        for call in ast.walk(node)
        if isinstance(call, ast.Call)
        and (getattr(call.func, "attr", None) or getattr(call.func, "id", None)) == name
    ]


def keywords(call: ast.Call) -> dict[str, Any]:
    return {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg is not None}


def our_arguments(tmp_path: Path) -> Any:
    hyper = TrainingHyperparams(validation_ratio=0.1)
    plan = make_plan(hyper, 100)
    gpu_like = Device(gpus=(), bf16=True)  # bf16, as on every GPU the operator schedules on
    return training.get_training_arguments(hyper, plan, gpu_like, str(tmp_path))


def test_fixed_training_arguments_are_followed(backend: ast.Module, tmp_path: Path) -> None:
    fixed = module_dict(backend, "FIXED_RUNTIME_TRAINING_ARGS")
    # Every key is accounted for: a new one in a release fails here until it is looked at.
    assert set(fixed) == {
        "num_train_epochs",  # the plan's step count instead (README: Differences)
        "save_strategy",  # checkpoints every ~5% instead, for resuming (README)
        "logging_steps",  # ~100 logged points instead, for the pod log (README)
        "logging_strategy",
        "per_device_eval_batch_size",
        "optim",
        "bf16",
        "ddp_find_unused_parameters",
    }
    args = our_arguments(tmp_path)
    assert args.optim.value == ast.literal_eval(fixed["optim"]) == training.OPTIMIZER
    assert args.per_device_eval_batch_size == ast.literal_eval(fixed["per_device_eval_batch_size"])
    assert args.bf16 is ast.literal_eval(fixed["bf16"]) is True
    assert args.ddp_find_unused_parameters is ast.literal_eval(fixed["ddp_find_unused_parameters"])
    assert ast.unparse(fixed["logging_strategy"]) == "IntervalStrategy.STEPS"
    assert args.logging_strategy.value == "steps"


def test_gradient_checkpointing_is_switched_on_as_there(
    backend: ast.Module, tmp_path: Path
) -> None:
    """Safe Synthesizer sets training_args["gradient_checkpointing"] = True and never passes
    gradient_checkpointing_kwargs: transformers' default (non-reentrant) applies."""
    standard = method(backend, "_configure_standard_training")
    assert "training_args['gradient_checkpointing'] = True" in ast.unparse(standard)
    assert "gradient_checkpointing_kwargs" not in ast.unparse(backend)
    args = our_arguments(tmp_path)
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs is None
    # what it leaves at transformers' defaults, we do too
    base = method(backend, "_build_base_training_args")
    passed = set(keywords(calls(base, "dict")[0]))
    assert not {"max_grad_norm", "seed", "adam_beta1", "adam_beta2", "adam_epsilon"} & passed
    assert (args.max_grad_norm, args.seed, args.adam_beta1, args.adam_beta2) == (
        1.0,
        42,
        0.9,
        0.999,
    )


def test_the_lora_config_is_built_as_there(backend: ast.Module) -> None:
    from nemo_safe_synthesizer.defaults import FIXED_RUNTIME_LORA_ARGS
    from peft import LoraConfig

    assert FIXED_RUNTIME_LORA_ARGS == {"use_rslora": adapters.USE_RSLORA}
    quant = method(backend, "_prepare_quantize_base")
    (first, *_) = calls(quant, "dict")
    assert set(keywords(first)) == {
        "task_type",
        "init_lora_weights",
        "inference_mode",
        "r",
        "target_modules",
        "peft_type",  # LoraConfig sets LORA itself, whatever is passed
        "lora_alpha",
        "use_rslora",
    }
    assert keywords(first)["init_lora_weights"] == "True"
    # loftq adds a LoftQConfig and keeps init_lora_weights True: peft drops it (see adapters.py)
    assert "self.quant_params['init_lora_weights'] = True" in ast.unparse(quant)
    assert calls(quant, "LoftQConfig")
    # No dropout and no bias are passed: peft's defaults, which ours are.
    ours = adapters.get_peft_config(TrainingHyperparams())
    defaults = LoraConfig()
    assert (ours.lora_dropout, ours.bias) == (defaults.lora_dropout, defaults.bias) == (0.0, "none")
    assert ours.use_rslora is True and ours.init_lora_weights is True


def test_the_base_is_prepared_as_there(backend: ast.Module) -> None:
    prepare = method(backend, "maybe_quantize")
    source = ast.unparse(prepare)
    (kbit,) = calls(prepare, "prepare_model_for_kbit_training")
    assert keywords(kbit) == {"use_gradient_checkpointing": "True"}
    assert "if not self.params.training.quantize_model:" in source
    (enable,) = calls(prepare, "gradient_checkpointing_enable")
    assert not enable.args and not enable.keywords
    assert calls(prepare, "enable_input_require_grads")
    assert "self.model.config.use_cache = False" in source
