"""The per-GPU memory estimate responds to every input it claims to use."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api.resource import FineTuneJobSpec
from finetune_operator.memory import KNOWN_MODELS, approximate_shape, estimate_memory, model_shape


def spec(training: dict[str, Any] | None = None, **extra: Any) -> FineTuneJobSpec:
    body: dict[str, Any] = {
        "dataset": {
            "claimName": "d",
            "path": "t.jsonl",
            "maxSequenceLength": extra.pop("seq", 2048),
        },
        "output": {"claimName": "o", "path": "a"},
        "training": {"pretrained_model": "meta-llama/Llama-3.1-8B", **(training or {})},
    }
    body.update(extra)
    return FineTuneJobSpec.model_validate(body)


def required(training: dict[str, Any] | None = None, **extra: Any) -> int:
    s = spec(training, **extra)
    shape = model_shape(s)
    assert shape is not None
    estimate = estimate_memory(s, shape)
    assert estimate is not None
    return estimate.required_mib


def test_fewer_bits_need_less_memory() -> None:
    full = required({"quantize_model": False})
    eight = required({"quantize_model": True, "quantization_scheme": "bnb-8bit"})
    four = required({"quantize_model": True, "quantization_scheme": "bnb-4bit"})
    assert four < eight < full


def test_base_weights_match_the_model_size() -> None:
    s = spec({"quantize_model": False})
    shape = KNOWN_MODELS["meta-llama/Llama-3.1-8B"]
    estimate = estimate_memory(s, shape)
    assert estimate is not None
    # 8.03 B parameters in bf16 are about 15.0 GiB
    assert 15000 < estimate.base_weights_mib < 15600


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ({"batch_size": 1}, {"batch_size": 4}),
        ({"lora_r": 8}, {"lora_r": 128}),
        (
            {"lora_target_modules": ["q_proj"]},
            {"lora_target_modules": ["q_proj", "gate_proj", "down_proj"]},
        ),
        ({"max_vram_fraction": 1.0}, {"max_vram_fraction": 0.5}),
    ],
)
def test_estimate_grows_with_its_inputs(smaller: dict[str, Any], larger: dict[str, Any]) -> None:
    assert required(smaller) < required(larger)


def test_sequence_length_grows_activations() -> None:
    assert required(seq=512) < required(seq=4096)


def test_fraction_divides_the_estimate() -> None:
    s = spec({"max_vram_fraction": 0.5})
    shape = model_shape(s)
    assert shape is not None
    estimate = estimate_memory(s, shape)
    assert estimate is not None
    assert estimate.required_mib == -(-estimate.used_mib // 0.5)


def test_zero_fraction_gives_no_estimate() -> None:
    s = spec({"max_vram_fraction": 0})
    shape = model_shape(s)
    assert shape is not None and estimate_memory(s, shape) is None


def test_unknown_model_needs_a_size() -> None:
    assert model_shape(spec({"pretrained_model": "acme/model"})) is None
    shape = model_shape(spec({"pretrained_model": "acme/model"}, model={"parametersBillions": 13}))
    assert shape is not None and shape.parameters_billions == 13


@pytest.mark.parametrize("billions", [0.5, 1, 3, 7, 13, 34, 70, 180])
def test_approximate_shape_has_about_the_right_size(billions: float) -> None:
    shape = approximate_shape(billions)
    block = shape.layers * (4 * shape.hidden**2 + 3 * shape.hidden * shape.intermediate)
    total = block + shape.non_block_parameters
    assert 0.6 * billions * 1e9 < total < 1.4 * billions * 1e9


def test_hub_id_in_spec_model_selects_the_table_entry() -> None:
    s = FineTuneJobSpec.model_validate(
        {
            "dataset": {"claimName": "d", "path": "t.jsonl"},
            "output": {"claimName": "o", "path": "a"},
            "model": {"hub": {"id": "Qwen/Qwen2.5-7B"}},
            "training": {"pretrained_model": "Qwen/Qwen2.5-7B"},
        }
    )
    assert model_shape(s) == KNOWN_MODELS["Qwen/Qwen2.5-7B"]


@pytest.mark.parametrize(
    ("scheme", "embedding_bytes"),
    [("bnb-4bit", 4), ("bnb-8bit", 4), ("fp8", 4), ("mxfp4", 4), ("nvfp4", 2), (None, 2)],
)
def test_embeddings_count_in_float32_once_kbit_prepared(
    scheme: str | None, embedding_bytes: int
) -> None:
    """The trainer runs peft's prepare_model_for_kbit_training on every quantized base (as Safe
    Synthesizer does), which upcasts what is not quantized (embeddings, LM head) to float32,
    except on torchao's nvfp4 model; the unquantized base keeps them in bf16."""
    from finetune_api.training import QuantizationScheme
    from finetune_operator.memory import MIB, STORAGE_BITS

    training: dict[str, Any] = {"quantize_model": scheme is not None}
    if scheme is not None:
        training["quantization_scheme"] = scheme
    s = spec(training)
    shape = KNOWN_MODELS["meta-llama/Llama-3.1-8B"]
    estimate = estimate_memory(s, shape)
    assert estimate is not None
    key = QuantizationScheme(scheme) if scheme is not None else None
    non_block = shape.non_block_parameters
    block = shape.parameters_billions * 1e9 - non_block
    expected = (block * STORAGE_BITS[key] / 8 + non_block * embedding_bytes) / MIB
    assert abs(estimate.base_weights_mib - expected) <= 1
