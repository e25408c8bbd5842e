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
    "warmup_steps": 0.05,
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
    assert params.model_dump() == DEFAULTS  # warmup_ratio (deprecated, None) is never dumped
    assert set(TrainingHyperparams.model_fields) == {*DEFAULTS, "warmup_ratio"}
    assert params.warmup_ratio is None
    assert params.effective_batch_size == 8
    assert params.resolved_quantization_scheme is None


# (field, accepted values at and inside the boundary, rejected values just outside it)
BOUNDARIES: list[tuple[str, list[Any], list[Any]]] = [
    ("num_input_records_to_sample", [0, 1, 50_000, "auto"], [-1, "lots", 2.5, "AUTO"]),
    ("batch_size", [1, 64], [0, -3, 1.5]),
    ("gradient_accumulation_steps", [1, 32], [0]),
    ("weight_decay", [1e-9, 0.5, 0.999999], [0, 0.0, 1, 1.0, -0.1]),
    ("warmup_steps", [0, 0.0, 1e-9, 0.5, 0.999, 1, 1.0, 2, 40.0], [-0.01, 1.5, 2.25, float("inf")]),
    ("warmup_ratio", [0, 1e-9, 0.5, 1.0, 3, None], [-0.01, 1.5, float("nan")]),
    ("lr_scheduler", list(LR_SCHEDULERS), ["exponential", "Cosine", ""]),
    ("learning_rate", [1e-9, 2e-4, 0.999999, "auto"], [0, 0.0, 1, 1.0, -1e-4, "fast", False]),
    ("lora_r", [1, 256], [0, -8]),
    ("lora_alpha_over_r", [0.5, 1.0, 3.0], [0.49, 3.01]),
    ("lora_target_modules", [["q_proj"], ["gate_proj", "up_proj", "down_proj"]], [[]]),
    ("rope_scaling_factor", [1, 4, "auto"], [0, -1, "double", 1.5]),
    ("validation_ratio", [0, 0.0, 0.2, 1.0], [-0.01, 1.01]),
    ("validation_steps", [1, 100], [0, -5]),
    ("pretrained_model", ["HuggingFaceTB/SmolLM3-3B", "/models/llama"], [""]),
    ("quantize_model", [True, False], ["perhaps"]),
    ("quantization_bits", [4, 8], [2, 16, 0, "4"]),
    (
        "quantization_scheme",
        [*QuantizationScheme, *(s.value for s in QuantizationScheme), None],
        ["int4", "bnb_4bit", "BNB-4BIT", 4, 8],
    ),
    # Any string: Safe Synthesizer reads only 'loftq' (on a quantized base); see peft_method.
    ("peft_implementation", ["lora", "LoRA", "QLORA", "qlora", "loftq", "LoftQ", "dora", ""], []),
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
def test_loftq_on_a_quantized_base_rejects_non_bitsandbytes_schemes(scheme: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams(
            quantize_model=True, quantization_scheme=scheme, peft_implementation="loftq"
        )
    message = format_validation_error(info.value, "spec.training")
    assert message == (
        f"spec.training.quantization_scheme: peft_implementation loftq cannot be used with "
        f"quantization_scheme "
        f"{scheme}: LoftQ needs a bitsandbytes scheme (bnb-4bit or bnb-8bit), and Safe "
        "Synthesizer's LoRA setup fails on any other"
    )


@pytest.mark.parametrize(
    ("settings", "method"),
    [
        # Safe Synthesizer compares peft_implementation == "loftq" on a quantized base only.
        ({"peft_implementation": "loftq", "quantization_scheme": "fp8"}, "lora"),
        ({"peft_implementation": "loftq"}, "lora"),
        (
            {"peft_implementation": "LoftQ", "quantize_model": True, "quantization_scheme": "fp8"},
            "qlora",
        ),
        ({"peft_implementation": "LOFTQ", "quantize_model": True}, "qlora"),
        ({"peft_implementation": "loftq", "quantize_model": True}, "loftq"),
        ({"peft_implementation": "loftq", "quantize_model": True, "quantization_bits": 4}, "loftq"),
        (
            {
                "peft_implementation": "loftq",
                "quantize_model": True,
                "quantization_scheme": "bnb-4bit",
            },
            "loftq",
        ),
        ({"peft_implementation": "lora", "quantize_model": True}, "qlora"),
        (
            {
                "peft_implementation": "anything",
                "quantize_model": True,
                "quantization_scheme": "nvfp4",
            },
            "qlora",
        ),
        ({"peft_implementation": "QLORA"}, "lora"),
    ],
)
def test_peft_method_as_safe_synthesizer_decides_it(settings: dict[str, Any], method: str) -> None:
    assert TrainingHyperparams.model_validate(settings).peft_method == method


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


@pytest.mark.parametrize(
    ("settings", "warmup"),
    [
        ({}, 0.05),
        ({"warmup_ratio": 0.2}, 0.2),  # the deprecated alias sets warmup_steps...
        ({"warmup_ratio": 2}, 2.0),  # ...with the same meaning: 2 steps, not a ratio of 2
        ({"warmup_ratio": 0.2, "warmup_steps": 7}, 7.0),  # ...unless warmup_steps is set
        ({"warmup_ratio": 0.2, "warmup_steps": 0.05}, 0.05),  # even to its default
        ({"warmup_ratio": None, "warmup_steps": 3}, 3.0),
        ({"warmup_steps": 0}, 0.0),
    ],
)
def test_warmup_ratio_is_a_deprecated_alias(settings: dict[str, Any], warmup: float) -> None:
    params = TrainingHyperparams.model_validate(settings)
    assert params.warmup_steps == warmup
    assert "warmup_ratio" not in params.model_dump()
    assert TrainingHyperparams.model_validate(params.model_dump()).warmup_steps == warmup


def test_warmup_message_names_the_rule() -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams(warmup_steps=1.5)
    assert format_validation_error(info.value, "spec.training") == (
        "spec.training.warmup_steps: warmup_steps must be 0 (no warmup), a ratio of the total "
        "steps below 1, or a whole number of steps from 1 on"
    )


@pytest.mark.parametrize(
    ("ratio", "rank", "alpha"),
    [(1.0, 32, 32), (0.5, 3, 1), (1.3, 32, 41), (2.0, 16, 32), (0.5, 1, 0)],
)
def test_lora_alpha_is_rounded_down_like_safe_synthesizer(
    ratio: float, rank: int, alpha: int
) -> None:
    params = TrainingHyperparams(lora_alpha_over_r=ratio, lora_r=rank)
    assert params.lora_alpha == alpha == int(ratio * rank)
    assert isinstance(params.lora_alpha, int)


@pytest.mark.parametrize(
    ("field", "value", "read"),
    [
        ("rope_scaling_factor", 2.0, 2),  # a whole number written as a float is an integer
        ("batch_size", 3.0, 3),
        ("warmup_steps", 2, 2.0),
        ("rope_scaling_factor", None, "auto"),  # null on a field that is not nullable: unset
    ],
)
def test_values_are_read_as_the_api_server_reads_them(field: str, value: Any, read: Any) -> None:
    assert getattr(TrainingHyperparams.model_validate({field: value}), field) == read


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # Safe Synthesizer's lax spellings, which the CRD's types refuse (README: what Kubernetes
        # decides before the model); the model refuses them too.
        ("batch_size", True),
        ("num_input_records_to_sample", True),
        ("lora_r", "3"),
        ("quantize_model", "yes"),
        ("quantize_model", 1),
        ("learning_rate", "0.001"),
        ("weight_decay", "0.1"),
    ],
)
def test_json_types_are_strict(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingHyperparams.model_validate({field: value})
    assert format_validation_error(info.value, "spec.training").startswith(f"spec.training.{field}")


def test_safe_synthesizer_block_pastes_unchanged() -> None:
    block = {
        "num_input_records_to_sample": 5000,
        "batch_size": 2,
        "gradient_accumulation_steps": 4,
        "weight_decay": 0.01,
        "warmup_steps": 0.1,
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
