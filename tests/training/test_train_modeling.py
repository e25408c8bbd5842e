"""Model loading and the adapter on the tiny Llama, through the trainer's own helpers: RoPE
scaling as the loaded model computes it, the attention implementation, the base and the LoRA
config as Safe Synthesizer prepares them (loftq included), and custom model code only when
trusted."""

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
    ("setting", "longest", "factor"),
    [
        (2, 10, 2),
        (1, 10**5, None),
        ("auto", 64, None),
        ("auto", 12_288, None),  # Safe Synthesizer's 'auto' scales past 12,288 tokens only
        ("auto", 12_289, 2),
        ("auto", 3 * 12_288, 3),
    ],
)
def test_rope_scaling_as_the_model_computes_it(
    tiny_model: TinyModel, setting: Any, longest: int, factor: int | None
) -> None:
    """The factor for the longest record's token count, applied to the real model."""
    import torch

    source = ModelSource(str(tiny_model.path), "tiny")
    plain = load(tiny_model, spec({"rope_scaling_factor": 1}))
    job = spec({"rope_scaling_factor": setting})
    config, applied = load_config(source, job, longest)
    assert applied == factor
    model = load_model(source, job, config, CPU, None)
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


def checkpointing(model: Any) -> tuple[bool, dict[str, Any] | None]:
    """Whether the base model checkpoints its decoder layers, and the kwargs the checkpoint
    function gets (None: not checkpointed)."""
    return checkpointing_of(model.get_base_model())


def checkpointing_of(base: Any) -> tuple[bool, dict[str, Any] | None]:
    """checkpointing() of a transformers model itself (no peft wrapper)."""
    layer = base.model.layers[0]
    func = getattr(layer, "_gradient_checkpointing_func", None)
    on = bool(base.is_activation_checkpointing) and bool(layer.gradient_checkpointing)
    return on, dict(func.keywords) if on and func is not None else None


BF16_CPU = Device(gpus=(), bf16=True)  # loads the base in bfloat16, as on a GPU


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
            {"peft_implementation": "lora", "quantize_model": True, "quantization_bits": 8},
            QuantizationScheme.BNB_8BIT,
            True,
        ),
        ({"peft_implementation": "QLORA"}, None, False),  # no quantization: plain LoRA
        ({"peft_implementation": "loftq"}, None, False),  # loftq without quantization: LoRA too
    ],
)
def test_the_base_is_prepared_as_safe_synthesizer_prepares_it(
    tiny_model: TinyModel,
    training: dict[str, Any],
    scheme: QuantizationScheme | None,
    prepared: bool,
) -> None:
    """Safe Synthesizer's maybe_quantize: a quantized base goes through peft's
    prepare_model_for_kbit_training(use_gradient_checkpointing=True) (its unquantized weights
    upcast to float32, checkpointing as that function sets it up in the installed peft and
    transformers: the reference is the same base prepared by peft directly); a plain base gets
    gradient_checkpointing_enable() (transformers' default: non-reentrant), inputs that require
    grad and no KV cache. The base loads in bfloat16, as on a GPU, so the upcast shows."""
    import torch
    from peft import prepare_model_for_kbit_training

    training = {**training, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]}
    job = spec(training)
    source = ModelSource(str(tiny_model.path), "tiny")
    config, _ = load_config(source, job)
    base = load_model(source, job, config, BF16_CPU, scheme)
    model, details = apply_peft(base, job.training)
    assert details["kbit_prepared"] is prepared
    on, kwargs = checkpointing(model)
    assert on
    inner = model.get_base_model()
    assert inner.config.use_cache is False
    hooked = getattr(inner, "_require_grads_hook", None) is not None  # the embeddings' output
    if prepared:
        reference = prepare_model_for_kbit_training(
            load_model(source, job, config, BF16_CPU, scheme), use_gradient_checkpointing=True
        )
        assert (on, kwargs) == checkpointing_of(reference)
        assert hooked == (getattr(reference, "_require_grads_hook", None) is not None)
    else:
        assert kwargs == {"use_reentrant": False}
        assert hooked
    norm = inner.model.layers[0].input_layernorm.weight
    assert norm.dtype == (torch.float32 if prepared else torch.bfloat16)
    assert inner.model.embed_tokens.weight.dtype == norm.dtype
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_config_is_safe_synthesizers(tiny_model: TinyModel) -> None:
    """The LoraConfig Safe Synthesizer builds: rank-stabilised scaling (alpha / sqrt(r)), and
    peft's defaults for what it does not set: dropout 0, no bias, B starting at zero."""
    import math

    import torch

    job = spec({"lora_r": 16, "lora_alpha_over_r": 1.5, "lora_target_modules": ["q_proj"]})
    model, details = apply_peft(load(tiny_model, job), job.training)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (16, 24, True)
    assert (config.lora_dropout, config.bias, config.init_lora_weights) == (0.0, "none", True)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 24 / math.sqrt(16)
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)  # dropout 0
    assert torch.all(layer.lora_B["default"].weight == 0)
    assert (details["use_rslora"], details["lora_dropout"]) == (True, 0.0)


def test_loftq_trains_qlora_as_in_safe_synthesizer(
    tiny_model: TinyModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Safe Synthesizer passes LoftQConfig with init_lora_weights=True, which peft drops: the
    adapter of a loftq job is the QLoRA adapter, the same matrices from the same seed."""
    import torch
    from transformers import set_seed

    adapters = {}
    for method in ("loftq", "QLORA"):
        training = {
            "peft_implementation": method,
            "quantize_model": True,
            "quantization_scheme": "bnb-4bit",
            "lora_r": 8,
            "lora_target_modules": ["q_proj", "down_proj"],
        }
        job = spec(training)
        set_seed(7)
        model, details = apply_peft(
            load(tiny_model, job, QuantizationScheme.BNB_4BIT), job.training
        )
        assert details["method"] == method.lower() and details["kbit_prepared"]
        assert model.peft_config["default"].loftq_config == {}
        adapters[method] = {
            n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
        }
    assert "peft_implementation loftq trains QLoRA, as in Safe Synthesizer 0.1.16" in caplog.text
    assert adapters["loftq"].keys() == adapters["QLORA"].keys()
    for name, weight in adapters["loftq"].items():
        assert torch.equal(weight, adapters["QLORA"][name]), name
        if "lora_B" in name:
            assert torch.all(weight == 0), name


def test_unknown_target_module_lists_the_linear_layers(tiny_model: TinyModel) -> None:
    job = spec({"lora_target_modules": ["qq_proj", "vv_proj"]})
    with pytest.raises(InvalidInputError) as error:
        apply_peft(load(tiny_model, job), job.training)
    assert str(error.value) == (
        "spec.training.lora_target_modules: no module named 'qq_proj', 'vv_proj' in the model; "
        "its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )


def test_a_target_matching_nothing_is_skipped_when_another_matches(
    tiny_model: TinyModel, caplog: pytest.LogCaptureFixture
) -> None:
    """peft (and so Safe Synthesizer) adapts the targets that exist and ignores the others."""
    job = spec({"lora_target_modules": ["q_proj", "qq_proj", ""]})
    model, _ = apply_peft(load(tiny_model, job), job.training)
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
    model, _ = apply_peft(load(tiny_model, job), job.training)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_target_lora_cannot_adapt_is_invalid_input(tiny_model: TinyModel) -> None:
    job = spec({"lora_target_modules": ["mlp"]})
    with pytest.raises(InvalidInputError) as error:
        apply_peft(load(tiny_model, job), job.training)
    assert str(error.value) == (
        "spec.training.lora_target_modules: 'mlp' names a LlamaMLP, not a linear layer; its "
        "linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )


@pytest.mark.parametrize(
    "training",
    [
        {"quantize_model": True, "quantization_scheme": "bnb-4bit"},
        {"quantize_model": False},
    ],
)
def test_the_trainer_trains_as_safe_synthesizers_does(
    tiny_model: TinyModel, tmp_path: Path, training: dict[str, Any]
) -> None:
    """The Trainer the pipeline builds, seen from inside its own run: the optimizer it created is
    bitsandbytes' paged 32-bit AdamW (Safe Synthesizer's optim="paged_adamw_32bit"), and once
    training starts every decoder layer checkpoints non-reentrantly (the Trainer's
    gradient_checkpointing=True re-enables it with transformers' default kwargs, whatever the
    preparation passed), as in Safe Synthesizer."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    from finetune_trainer import distributed, pipeline
    from finetune_trainer.config import PathOverrides, load_trainer_config
    from training.helpers import manifest, text_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", text_rows(8))
    job = manifest(
        tmp_path / "job.yaml",
        training={
            **training,
            "num_input_records_to_sample": 4,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "lora_r": 2,
            "lora_target_modules": ["q_proj", "v_proj"],
        },
    )
    overrides = PathOverrides(str(tiny_model.path), str(data), str(tmp_path / "out"))
    config = load_trainer_config(str(job), overrides)
    scheme = config.spec.training.resolved_quantization_scheme
    ready = pipeline.prepare(config)
    base = load_model(ready.model, config.spec, ready.model_config, CPU, scheme)
    model, _ = apply_peft(base, config.spec.training)
    trainer = pipeline.get_trainer(config, ready, model, CPU, distributed.current())
    seen: dict[str, Any] = {}

    class Look(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen.setdefault("optimizer", kw["optimizer"])
            seen.setdefault("checkpointing", checkpointing(kw["model"]))

    trainer.add_callback(Look())
    trainer.train()
    assert trainer.state.global_step == 2
    optimizer = getattr(seen["optimizer"], "optimizer", seen["optimizer"])  # accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.AdamW)
    assert optimizer.is_paged is True and optimizer.args.optim_bits == 32
    assert seen["checkpointing"] == (True, {"use_reentrant": False})


@pytest.mark.parametrize(("words", "factor"), [(100, None), (13_000, 2)])
def test_auto_rope_follows_the_longest_record(
    tiny_model: TinyModel, tmp_path: Path, words: int, factor: int | None
) -> None:
    """'auto' counts the longest record's tokens with the model's tokenizer, whole (before the
    truncation to maxSequenceLength), and scales past Safe Synthesizer's 12,288 tokens; the
    'auto' record count follows the factor, as there."""
    from finetune_trainer import pipeline
    from finetune_trainer.config import PathOverrides, load_trainer_config
    from training.helpers import manifest, text_rows, write_jsonl

    long = {"text": " ".join(["the"] * words), "id": 99}
    data = write_jsonl(tmp_path / "train.jsonl", [*text_rows(4), long])
    job = manifest(
        tmp_path / "job.yaml",
        training={"rope_scaling_factor": "auto", "num_input_records_to_sample": "auto"},
        dataset={"maxSequenceLength": 32},
    )
    overrides = PathOverrides(str(tiny_model.path), str(data), str(tmp_path / "out"))
    ready = pipeline.prepare(load_trainer_config(str(job), overrides))
    assert ready.rope_factor == factor
    assert ready.plan.records == 25_000 * (factor or 1)
    assert ready.model_config.max_position_embeddings == tiny_model.context * (factor or 1)
    assert max(len(example.input_ids) for example in ready.train + ready.validation) <= 32
