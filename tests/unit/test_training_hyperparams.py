"""TrainingHyperparams: every default, both sides of every range, aliases and cross-field rules."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from finetune_api import QuantizationScheme, TrainingHyperparams, format_validation_error
from finetune_api.training import LR_SCHEDULERS

DEFAULTS: dict[str, Any] = {
    "num_input_records_to_sample": "auto",
    "batch_size": 1,
    "gradient_accumulation_steps": 8,
    "weight_decay": 0.01,
    "warmup_ratio": 0.05,
    "lr_scheduler": "cosine",
    "learning_rate": "auto",
    "lora_r": 32,
    "lora_alpha_over_r": 1.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rope_scaling_factor": "auto",
    "validation_ratio": 0.0,
    "validation_steps": 15,
    "pretrained_model": "HuggingFaceTB/SmolLM3-3B",
    "quantize_model": False,
    "quantization_bits": 8,
    "quantization_scheme": None,
    "peft_implementation": "QLORA",
    "max_vram_fraction": 0.8,
    "attn_implementation": "sdpa",
}


def test_all_defaults_validate_and_match_safe_synthesizer() -> None:
    params = TrainingHyperparams()
    assert params.model_dump() == DEFAULTS
    assert set(TrainingHyperparams.model_fields) == set(DEFAULTS)
    assert params.effective_batch_size == 8
    assert params.resolved_quantization_scheme is None


# (field, accepted values at and inside the boundary, rejected values just outside it)
BOUNDARIES: list[tuple[str, list[Any], list[Any]]] = [
    ("num_input_records_to_sample", [0, 1, 50_000, "auto"], [-1, "lots", 2.5, True]),
    ("batch_size", [1, 64], [0, -3]),
    ("gradient_accumulation_steps", [1, 32], [0]),
    ("weight_decay", [1e-9, 0.5, 0.999999], [0, 0.0, 1, 1.0, -0.1]),
    ("warmup_ratio", [1e-9, 0.5, 1.0], [0, -0.01]),
    ("lr_scheduler", list(LR_SCHEDULERS), ["exponential", "Cosine", ""]),
    ("learning_rate", [1e-9, 2e-4, 0.999999, "auto"], [0, 0.0, 1, 1.0, -1e-4, "fast", False]),
    ("lora_r", [1, 256], [0, -8]),
    ("lora_alpha_over_r", [0.5, 1.0, 3.0], [0.49, 3.01]),
    ("lora_target_modules", [["q_proj"], ["gate_proj", "up_proj", "down_proj"]], [[]]),
    ("rope_scaling_factor", [1, 4, "auto", None], [0, -1, "double", 1.5]),
    ("validation_ratio", [0, 0.0, 0.2, 1.0], [-0.01, 1.01]),
    ("validation_steps", [1, 100], [0, -5]),
    ("pretrained_model", ["HuggingFaceTB/SmolLM3-3B", "/models/llama"], [""]),
    ("quantize_model", [True, False], ["perhaps"]),
    ("quantization_bits", [4, 8], [2, 16, 0]),
    (
        "quantization_scheme",
        [*QuantizationScheme, *(s.value for s in QuantizationScheme), None],
        ["int4", "bnb_4bit"],
    ),
    (
        "peft_implementation",
        ["lora", "LoRA", "QLORA", "qlora", "loftq", "LoftQ"],
        ["dora", "ia3", ""],
    ),
    ("max_vram_fraction", [0, 0.0, 0.5, 1.0], [-0.01, 1.01]),
    (
        "attn_implementation",
        ["sdpa", "eager", "flash_attention_2", "kernels-community/flash-attn2"],
        [""],
    ),
]


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, good, _ in BOUNDARIES for v in good])
def test_accepts_values_within_range(field: str, value: Any) -> None:
    params = TrainingHyperparams.model_validate({field: value})
    assert getattr(params, field) == value


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, _, bad in BOUNDARIES for v in bad])
def test_rejects_values_outside_range_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams.model_validate({field: value})
    message = format_validation_error(info.value, root="spec.training")
    assert message.startswith(f"spec.training.{field}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (-1, "greater than or equal to 0"),
        ("lots", "must be an integer or 'auto'"),
    ],
)
def test_auto_field_messages_name_the_rule(value: Any, rule: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams(num_input_records_to_sample=value)
    assert rule in format_validation_error(info.value)
    assert len(info.value.errors()) == 1  # one error, not one per union member


def test_learning_rate_range_message() -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams(learning_rate=1.5)
    assert format_validation_error(info.value, "spec.training") == (
        "spec.training.learning_rate: Input should be less than 1 (or 'auto')"
    )


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams.model_validate({"lora_rank": 8})
    assert format_validation_error(info.value, "spec.training") == (
        "spec.training.lora_rank: unknown field"
    )


def test_effective_batch_size_and_lora_alpha() -> None:
    params = TrainingHyperparams(
        batch_size=3, gradient_accumulation_steps=5, lora_r=16, lora_alpha_over_r=2
    )
    assert params.effective_batch_size == 15
    assert params.lora_alpha == 32


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"quantize_model": False, "quantization_scheme": "fp8"}, None),
        ({"quantize_model": True}, QuantizationScheme.BNB_8BIT),  # quantization_bits default 8
        ({"quantize_model": True, "quantization_bits": 4}, QuantizationScheme.BNB_4BIT),
        ({"quantize_model": True, "quantization_bits": 8}, QuantizationScheme.BNB_8BIT),
        (
            {"quantize_model": True, "quantization_bits": 4, "quantization_scheme": "nvfp4"},
            QuantizationScheme.NVFP4,
        ),
        ({"quantize_model": True, "quantization_scheme": "mxfp4"}, QuantizationScheme.MXFP4),
    ],
)
def test_resolved_scheme(settings: dict[str, Any], expected: QuantizationScheme | None) -> None:
    assert TrainingHyperparams.model_validate(settings).resolved_quantization_scheme == expected


@pytest.mark.parametrize("scheme", ["fp8", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("peft", ["loftq", "LoftQ", "LOFTQ"])
def test_loftq_rejects_non_bitsandbytes_schemes(scheme: str, peft: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams(
            quantize_model=True, quantization_scheme=scheme, peft_implementation=peft
        )
    message = format_validation_error(info.value, "spec.training")
    assert f"quantization_scheme {scheme} cannot be used with peft_implementation loftq" in message


@pytest.mark.parametrize("scheme", ["bnb-4bit", "bnb-8bit", None])
def test_loftq_accepts_bitsandbytes(scheme: str | None) -> None:
    params = TrainingHyperparams(
        quantize_model=True, quantization_scheme=scheme, peft_implementation="loftq"
    )
    assert params.peft_method == "loftq"


@pytest.mark.parametrize("peft", ["lora", "QLORA"])
@pytest.mark.parametrize("scheme", list(QuantizationScheme))
def test_other_peft_methods_accept_every_scheme(peft: str, scheme: QuantizationScheme) -> None:
    TrainingHyperparams(quantize_model=True, quantization_scheme=scheme, peft_implementation=peft)


@pytest.mark.parametrize("value", [4, 8, True, "BNB-4BIT"])
def test_scheme_takes_only_its_names(value: object) -> None:
    """A bit count belongs in quantization_bits: the CRD's field is a string enum, and Safe
    Synthesizer refuses a number here too."""
    with pytest.raises(ValidationError, match="must be one of bnb-4bit, bnb-8bit, fp8"):
        TrainingHyperparams(quantization_scheme=value)  # type: ignore[arg-type]


def test_safe_synthesizer_block_pastes_unchanged() -> None:
    block = {
        "num_input_records_to_sample": 5000,
        "batch_size": 2,
        "gradient_accumulation_steps": 4,
        "weight_decay": 0.01,
        "warmup_ratio": 0.1,
        "lr_scheduler": "linear",
        "learning_rate": 0.0005,
        "lora_r": 16,
        "lora_alpha_over_r": 2.0,
        "lora_target_modules": [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        "rope_scaling_factor": 2,
        "validation_ratio": 0.1,
        "validation_steps": 20,
        "pretrained_model": "meta-llama/Llama-3.2-1B",
        "quantize_model": True,
        "quantization_bits": 4,
        "peft_implementation": "QLORA",
        "max_vram_fraction": 0.9,
        "attn_implementation": "flash_attention_2",
    }
    params = TrainingHyperparams.model_validate(block)
    assert params.model_dump(exclude={"quantization_scheme"}) == block
    assert params.resolved_quantization_scheme is QuantizationScheme.BNB_4BIT
