"""Model loading and the adapter on the tiny Llama, through the trainer's own helpers: RoPE
scaling as the loaded model computes it, the attention implementation, what QLoRA prepares, and
LoftQ's initialisation, and custom model code only when trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune_api import FineTuneJobSpec, QuantizationScheme
from finetune_trainer.adapters import apply_peft
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.hardware import Device
from finetune_trainer.modeling import ModelSource, load_config, load_model
from training.helpers import TinyModel

pytestmark = pytest.mark.training

CPU = Device(gpus=(), bf16=False)


def spec(training: dict[str, Any] | None = None, max_length: int = 64) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "dataset": {"claimName": "d", "path": "t.jsonl", "maxSequenceLength": max_length},
            "output": {"claimName": "o", "path": "x"},
            "training": training or {},
        }
    )


def load(tiny: TinyModel, job: FineTuneJobSpec, scheme: QuantizationScheme | None = None) -> Any:
    source = ModelSource(str(tiny.path), "tiny")
    config, _ = load_config(source, job)
    return load_model(source, job, config, CPU, scheme)


def inv_freq(model: Any) -> Any:
    return model.model.rotary_emb.inv_freq


@pytest.mark.parametrize(
    ("setting", "max_length", "factor"),
    [(2, 64, 2), (1, 64, None), ("auto", 64, None), ("auto", 300, 3), ("auto", 128, None)],
)
def test_rope_scaling_as_the_model_computes_it(
    tiny_model: TinyModel, setting: Any, max_length: int, factor: int | None
) -> None:
    import torch

    plain = load(tiny_model, spec({"rope_scaling_factor": 1}))
    job = spec({"rope_scaling_factor": setting}, max_length)
    _, applied = load_config(ModelSource(str(tiny_model.path), "tiny"), job)
    assert applied == factor
    model = load(tiny_model, job)
    if factor is None:
        assert model.config.rope_parameters["rope_type"] == "default"
        assert model.config.max_position_embeddings == tiny_model.context
        assert torch.equal(inv_freq(model), inv_freq(plain))
    else:
        assert model.config.rope_parameters["rope_type"] == "linear"
        assert model.config.rope_parameters["factor"] == float(factor)
        assert model.config.max_position_embeddings == tiny_model.context * factor
        assert torch.allclose(inv_freq(model), inv_freq(plain) / factor)


def test_rope_already_scaled_is_multiplied(tiny_model: TinyModel) -> None:
    from transformers import AutoConfig

    from finetune_trainer.modeling import scale_rope

    config = AutoConfig.from_pretrained(tiny_model.path)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    scale_rope(config, 3, 3)
    assert config.rope_parameters["factor"] == 6.0
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(InvalidInputError, match=r"already uses 'dynamic' RoPE scaling"):
        scale_rope(config, 2, "auto")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementation(tiny_model: TinyModel, attn: str) -> None:
    model = load(tiny_model, spec({"attn_implementation": attn}))
    assert model.config._attn_implementation == attn


def gradient_checkpointing(model: Any) -> bool:
    return bool(model.get_base_model().is_activation_checkpointing)


@pytest.mark.parametrize(
    ("training", "scheme", "prepared"),
    [
        (
            {"peft_implementation": "QLORA", "quantize_model": True},
            QuantizationScheme.BNB_4BIT,
            True,
        ),
        # As in Safe Synthesizer, any peft_implementation on a quantized base is QLoRA
        (
            {"peft_implementation": "lora", "quantize_model": True},
            QuantizationScheme.BNB_4BIT,
            True,
        ),
        ({"peft_implementation": "QLORA"}, None, False),  # no quantization: plain LoRA
        ({"peft_implementation": "loftq"}, None, False),  # loftq without quantization: LoRA too
    ],
)
def test_qlora_prepares_kbit_training_only_on_a_quantized_base(
    tiny_model: TinyModel,
    training: dict[str, Any],
    scheme: QuantizationScheme | None,
    prepared: bool,
) -> None:

    training = {**training, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]}
    job = spec(training)
    model, details = apply_peft(
        load(tiny_model, job, scheme), job.training, scheme, str(tiny_model.path)
    )
    assert details["kbit_prepared"] is prepared
    assert gradient_checkpointing(model) is prepared
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("scheme", [QuantizationScheme.BNB_4BIT, QuantizationScheme.BNB_8BIT])
def test_loftq_reduces_the_quantization_error(
    tiny_model: TinyModel, scheme: QuantizationScheme
) -> None:
    import torch

    from finetune_trainer.loftq import dequantize

    training = {
        "peft_implementation": "loftq",
        "quantize_model": True,
        "quantization_scheme": scheme.value,
        "lora_r": 8,
        "lora_alpha_over_r": 2.0,
        "lora_target_modules": ["q_proj", "down_proj"],
    }
    job = spec(training)
    model, details = apply_peft(
        load(tiny_model, job, scheme), job.training, scheme, str(tiny_model.path)
    )
    assert details["loftq"]["layers"] == 4
    assert details["loftq"]["mean_error_after"] < details["loftq"]["mean_error_before"]

    # Check one layer independently: W ~ dequantized + scaling * B @ A, better than dequantized.
    from safetensors import safe_open

    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with safe_open(str(tiny_model.path / "model.safetensors"), "pt") as weights:
        original = weights.get_tensor("model.layers.1.mlp.down_proj.weight").float()
    quantized = dequantize(layer.get_base_layer())
    correction = layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    before = torch.linalg.norm(original - quantized)
    after = torch.linalg.norm(original - (quantized + correction))
    assert after < 0.9 * before
    assert not torch.all(layer.lora_B["default"].weight == 0)  # not the default zero init


def test_unknown_target_module_lists_the_linear_layers(tiny_model: TinyModel) -> None:
    job = spec({"lora_target_modules": ["qq_proj", "vv_proj"]})
    with pytest.raises(InvalidInputError) as error:
        apply_peft(load(tiny_model, job), job.training, None, str(tiny_model.path))
    assert str(error.value) == (
        "spec.training.lora_target_modules: no module named 'qq_proj', 'vv_proj' in the model; "
        "its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )


def test_a_target_matching_nothing_is_skipped_when_another_matches(
    tiny_model: TinyModel, caplog: pytest.LogCaptureFixture
) -> None:
    """peft (and so Safe Synthesizer) adapts the targets that exist and ignores the others."""
    job = spec({"lora_target_modules": ["q_proj", "qq_proj", ""]})
    model, _ = apply_peft(load(tiny_model, job), job.training, None, str(tiny_model.path))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert adapted == {"q_proj"}
    assert "no module named 'qq_proj', '' in the model; skipped" in caplog.text


def custom_code_model(tiny: TinyModel, directory: Path) -> Path:
    """The tiny model, declared as a custom architecture whose code ships in the model directory."""
    shutil.copytree(tiny.path, directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "tiny_custom"
    config["architectures"] = ["TinyForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class TinyConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n"
    )
    (directory / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n"
    )
    return directory


def test_custom_code_runs_only_when_trusted(tiny_model: TinyModel, tmp_path: Path) -> None:
    directory = custom_code_model(tiny_model, tmp_path / "custom")
    source = ModelSource(str(directory), "custom")
    with pytest.raises(InvalidInputError) as refused:
        load_config(source, spec())
    assert str(refused.value) == (
        "model custom: its repository contains custom code; set spec.model.trustRemoteCode: "
        "true to run it (only for sources you trust)"
    )
    trusted = spec().model_copy(deep=True)
    trusted.model.trust_remote_code = True
    config, _ = load_config(source, trusted)
    model = load_model(source, trusted, config, CPU, None)
    assert type(model).__name__ == "TinyForCausalLM"


def test_all_linear_targets_every_projection_but_the_head(tiny_model: TinyModel) -> None:
    job = spec({"lora_target_modules": ["all-linear"], "lora_r": 2})
    model, _ = apply_peft(load(tiny_model, job), job.training, None, str(tiny_model.path))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_target_lora_cannot_adapt_is_invalid_input(tiny_model: TinyModel) -> None:
    job = spec({"lora_target_modules": ["mlp"]})
    with pytest.raises(InvalidInputError) as error:
        apply_peft(load(tiny_model, job), job.training, None, str(tiny_model.path))
    assert str(error.value) == (
        "spec.training.lora_target_modules: 'mlp' names a LlamaMLP, not a linear layer; its "
        "linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
