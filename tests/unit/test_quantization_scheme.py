"""QuantizationScheme: aliases, properties, and the transformers config each scheme builds."""

from __future__ import annotations

import pytest

from finetune_api import QuantizationScheme


def test_members_and_values() -> None:
    assert [s.value for s in QuantizationScheme] == [
        "bnb-4bit",
        "bnb-8bit",
        "fp8",
        "nvfp4",
        "mxfp4",
    ]
    assert QuantizationScheme.FP8 == "fp8"  # a StrEnum compares equal to its value


@pytest.mark.parametrize("scheme", list(QuantizationScheme))
def test_from_alias_member_and_string(scheme: QuantizationScheme) -> None:
    assert QuantizationScheme.from_alias(scheme) is scheme
    assert QuantizationScheme.from_alias(scheme.value) is scheme


@pytest.mark.parametrize(
    ("bits", "scheme"), [(4, QuantizationScheme.BNB_4BIT), (8, QuantizationScheme.BNB_8BIT)]
)
def test_from_alias_legacy_bits(bits: int, scheme: QuantizationScheme) -> None:
    assert QuantizationScheme.from_alias(bits) is scheme


@pytest.mark.parametrize("bits", [0, 2, 3, 5, 16, -4])
def test_from_alias_other_ints_fail_naming_the_value(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"{bits}.*Expected 4 or 8"):
        QuantizationScheme.from_alias(bits)


@pytest.mark.parametrize("text", ["int4", "BNB-4BIT", "4", ""])
def test_from_alias_unknown_strings_fail(text: str) -> None:
    with pytest.raises(ValueError, match="is not a valid QuantizationScheme"):
        QuantizationScheme.from_alias(text)


@pytest.mark.parametrize(
    ("scheme", "bits", "bnb"),
    [
        ("bnb-4bit", 4, True),
        ("bnb-8bit", 8, True),
        ("fp8", 8, False),
        ("nvfp4", 4, False),
        ("mxfp4", 4, False),
    ],
)
def test_effective_bits_and_is_bitsandbytes(scheme: str, bits: int, bnb: bool) -> None:
    member = QuantizationScheme(scheme)
    assert member.effective_bits == bits
    assert member.is_bitsandbytes is bnb


def test_bnb_4bit_config() -> None:
    torch = pytest.importorskip("torch")
    from transformers import BitsAndBytesConfig

    config = QuantizationScheme.BNB_4BIT.to_transformers_config()
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_bnb_8bit_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = QuantizationScheme.BNB_8BIT.to_transformers_config()
    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert config.load_in_8bit and not config.load_in_4bit


def test_fp8_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = QuantizationScheme.FP8.to_transformers_config()
    assert isinstance(config, transformers.FineGrainedFP8Config)
    assert config.quant_method == "fp8"


def test_nvfp4_config() -> None:
    transformers = pytest.importorskip("transformers")
    from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

    config = QuantizationScheme.NVFP4.to_transformers_config()
    assert isinstance(config, transformers.TorchAoConfig)
    assert isinstance(config.quant_type, NVFP4WeightOnlyConfig)


def test_mxfp4_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = QuantizationScheme.MXFP4.to_transformers_config()
    assert isinstance(config, transformers.Mxfp4Config)
    assert config.quant_method == "mxfp4"


def test_scheduler_list_matches_transformers() -> None:
    from finetune_api.training import LR_SCHEDULERS

    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    assert set(LR_SCHEDULERS) == {s.value for s in trainer_utils.SchedulerType}
