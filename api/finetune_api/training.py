"""Training hyperparameters, field for field compatible with NeMo Safe Synthesizer's `training:` block
(the release SAFE_SYNTHESIZER_VERSION names; tests/unit/test_safe_synthesizer_diff.py checks it).

This module must stay importable without torch, transformers or kopf: the operator image has
none of them. ML libraries are imported only inside `QuantizationScheme.to_transformers_config`.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from finetune_api.rules import RuledModel, cel_rule

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers.utils.quantization_config import QuantizationConfigMixin

# The values of `transformers.trainer_utils.SchedulerType`, kept here so that the API (and the CRD's
# enum) does not need transformers. A trainer-tier test checks this list against transformers.
LR_SCHEDULERS: tuple[str, ...] = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)

# The Safe Synthesizer release this model follows (also pinned in pyproject.toml's dev extras).
SAFE_SYNTHESIZER_VERSION = "0.1.16"


class QuantizationScheme(enum.StrEnum):
    """How the frozen base model's weights are quantized while the LoRA adapter trains."""

    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"
    FP8 = "fp8"
    NVFP4 = "nvfp4"
    MXFP4 = "mxfp4"

    @classmethod
    def from_alias(cls, scheme: QuantizationScheme | str | int) -> QuantizationScheme:
        """Return the scheme for a member, its string value, or a legacy bit count (4 or 8)."""
        if isinstance(scheme, bool):  # bool is an int subclass; True is not a bit count
            raise ValueError(f"Unknown quantization scheme: {scheme!r}")
        if isinstance(scheme, int):
            legacy = {4: cls.BNB_4BIT, 8: cls.BNB_8BIT}
            if scheme not in legacy:
                raise ValueError(f"Unknown quantization bit count {scheme!r}. Expected 4 or 8.")
            return legacy[scheme]
        return cls(scheme)

    @property
    def effective_bits(self) -> int:
        """Bits stored per frozen base-model parameter, used by the memory estimate."""
        return _EFFECTIVE_BITS[self]

    @property
    def is_bitsandbytes(self) -> bool:
        """True for the bitsandbytes schemes, the ones QLoRA k-bit training and LoftQ support."""
        return self in (QuantizationScheme.BNB_4BIT, QuantizationScheme.BNB_8BIT)

    def to_transformers_config(self) -> QuantizationConfigMixin:
        """Build the transformers `quantization_config` object for this scheme.

        transformers (and torch / torchao where needed) are imported here, not at module level.
        """
        match self:
            case QuantizationScheme.BNB_4BIT:
                import torch
                from transformers import BitsAndBytesConfig

                return BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                )
            case QuantizationScheme.BNB_8BIT:
                from transformers import BitsAndBytesConfig

                return BitsAndBytesConfig(load_in_8bit=True)
            case QuantizationScheme.FP8:
                from transformers import FineGrainedFP8Config

                return FineGrainedFP8Config()
            case QuantizationScheme.NVFP4:
                from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
                from transformers import TorchAoConfig

                return TorchAoConfig(quant_type=NVFP4WeightOnlyConfig())
            case QuantizationScheme.MXFP4:
                from transformers import Mxfp4Config

                return Mxfp4Config()
        raise ValueError(f"Unknown quantization scheme: {self!r}")  # pragma: no cover


_EFFECTIVE_BITS: dict[QuantizationScheme, int] = {
    QuantizationScheme.BNB_4BIT: 4,
    QuantizationScheme.BNB_8BIT: 8,
    QuantizationScheme.FP8: 8,
    QuantizationScheme.NVFP4: 4,
    QuantizationScheme.MXFP4: 4,
}


def is_valid_warmup(value: float) -> bool:
    """Whether `value` is a warmup transformers can use: 0 (none), a ratio in (0, 1) of the total
    steps, or a whole number of steps from 1 on. Fractions from 1 on would be truncated by
    transformers (1.5 becomes 1 step) and infinities or NaN fail when converted to a step count,
    so Safe Synthesizer refuses both, and so does this model."""
    return math.isfinite(value) and value >= 0 and (value < 1 or float(value).is_integer())


WARMUP_RULE = (
    "must be 0 (no warmup), a ratio of the total steps below 1, or a whole number of steps from 1 "
    "on"
)


def _warmup_cel(field: str) -> str:
    """The warmup rule in CEL (doubles from 2^53 on are all whole, and int() could overflow)."""
    value = f"self.{field}"
    return (
        f"!has({value}) || {value} < 1.0 || {value} >= 9007199254740992.0"
        f" || {value} == double(int({value}))"
    )


def _one_error(kind: str) -> WrapValidator:
    """One clear error for a value that is neither `kind` in range nor 'auto', instead of one error
    per member of the union. Acceptance is the union's own: this only rewrites its errors."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            ranges = [e["msg"] for e in exc.errors() if e["type"] in _RANGE_ERRORS]
            if ranges:  # a number of the right kind, out of range: report the range rule
                raise PydanticCustomError(
                    "number_or_auto", "{rule} (or 'auto')", {"rule": ranges[0]}
                ) from None
            raise PydanticCustomError(
                "number_or_auto", f"must be {kind} or 'auto', got {{value}}", {"value": repr(value)}
            ) from None

    return WrapValidator(validate)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}

# "auto" or a number, coerced the way Safe Synthesizer's `Literal["auto"] | int` (or float) fields
# coerce them (pydantic's lax mode: "12" and True are numbers too). In the CRD these become
# int-or-string (or an equivalent structural form).
AutoRecords = Annotated[Literal["auto"] | Annotated[int, Field(ge=0)], _one_error("an integer")]
AutoLearningRate = Annotated[
    Literal["auto"] | Annotated[float, Field(gt=0, lt=1)], _one_error("a number")
]
AutoRopeFactor = Annotated[Literal["auto"] | Annotated[int, Field(ge=1)], _one_error("an integer")]


def _warmup_schema(schema: dict[str, Any]) -> None:
    """The CRD checks the bound it can express (>= 0; the rest of the rule is the model's).

    warmup_steps publishes no default: the API server would store it in every object, and a block
    that sets only the deprecated warmup_ratio would then reach the model with warmup_steps set as
    well, which wins. The model applies the default instead."""
    schema.pop("default", None)
    schema["minimum"] = 0


def _warmup_ratio_schema(schema: dict[str, Any]) -> None:
    schema["deprecated"] = True
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "number":
            branch["minimum"] = 0


class TrainingHyperparams(RuledModel):
    """Fine-tuning hyperparameters: NeMo Safe Synthesizer's `training` block (release
    SAFE_SYNTHESIZER_VERSION) field for field, with the same names, defaults, ranges and accepted
    values, so such a block can be pasted here unchanged. README.md "Differences from Safe
    Synthesizer" lists what is refused earlier, and why."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    num_input_records_to_sample: Annotated[
        AutoRecords,
        Field(
            description=(
                "How many training records the model sees in total; it sets the length of training. "
                "Equal to the dataset size it is about one epoch, larger means several (possibly "
                "fractional) epochs, smaller a fraction of one. An integer >= 0, or 'auto' for 25,000 "
                "x the factor rope_scaling_factor 'auto' resolves to (25,000 when it is a number), "
                "as Safe Synthesizer resolves it."
            ),
        ),
    ] = "auto"
    batch_size: Annotated[
        int,
        Field(ge=1, description="Training examples per device in each forward pass. Must be >= 1."),
    ] = 1
    gradient_accumulation_steps: Annotated[
        int,
        Field(
            ge=1,
            description=(
                "Forward/backward passes whose gradients are summed before each optimizer step; "
                "raises the effective batch size without more GPU memory. Must be >= 1."
            ),
        ),
    ] = 8
    weight_decay: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description=(
                "AdamW weight decay, applied to every weight except biases and LayerNorm weights. "
                "Must be in (0, 1)."
            ),
        ),
    ] = 0.01
    warmup_steps: Annotated[
        float,
        Field(
            json_schema_extra=_warmup_schema,
            description=(
                "Learning-rate warmup, a linear ramp from 0 up to the learning rate: 0 means none, "
                "a number below 1 is a ratio of the total optimizer steps (rounded up), a whole "
                "number from 1 on is a count of steps. Must be finite and >= 0, and whole from 1 "
                "on. Default 0.05 (or warmup_ratio when only that is set)."
            ),
        ),
    ] = 0.05
    warmup_ratio: Annotated[
        float | None,
        Field(
            exclude=True,
            description=(
                "Deprecated, use warmup_steps (same values, same meaning). Used only when "
                "warmup_steps is not set; never part of the resolved spec."
            ),
            json_schema_extra=_warmup_ratio_schema,
        ),
    ] = None
    lr_scheduler: Annotated[
        str,
        Field(
            description=(
                "Learning-rate schedule after warmup: one of the Hugging Face transformers "
                "SchedulerType values (linear, cosine, constant, ...)."
            ),
            json_schema_extra={"enum": list(LR_SCHEDULERS)},
        ),
    ] = "cosine"
    learning_rate: Annotated[
        AutoLearningRate,
        Field(
            description=(
                "Peak learning rate of the AdamW optimizer. Must be in (0, 1), or 'auto' for the "
                "rate Safe Synthesizer gives the model class pretrained_model's name contains: "
                "1e-4 for Mistral, 5e-4 for TinyLlama, Qwen, Llama32, SmolLM2, SmolLM3, Nemotron "
                "and Granite; a name of none of them needs a number."
            ),
        ),
    ] = "auto"
    lora_r: Annotated[
        int,
        Field(
            gt=0,
            description=(
                "Rank of the LoRA update matrices. A lower rank trains fewer parameters. Must be > 0."
            ),
        ),
    ] = 32
    lora_alpha_over_r: Annotated[
        float,
        Field(
            ge=0.5,
            le=3,
            description=(
                "LoRA alpha divided by the rank; training uses alpha = int(lora_alpha_over_r x "
                "lora_r), rounded down to a whole number. 0.5, 1 and 2 are the usual choices. "
                "Must be in [0.5, 3]."
            ),
        ),
    ] = 1.0
    lora_target_modules: Annotated[
        list[Annotated[str, Field(max_length=256)]],
        Field(
            max_length=64,
            description=(
                "Names of the model's layers that receive LoRA adapters, e.g. q_proj, k_proj, "
                "v_proj, o_proj, gate_proj, up_proj, down_proj. At least one must exist in the "
                "model; ['all-linear'] adapts every linear layer but the output head."
            ),
            json_schema_extra={"minItems": 1},
        ),
    ] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rope_scaling_factor: Annotated[
        AutoRopeFactor,
        Field(
            description=(
                "Stretch the base model's context window by this integer factor with RoPE scaling. "
                "Must be >= 1 (1: no scaling), or 'auto' to scale only as far as the longest "
                "training sequence needs."
            ),
        ),
    ] = "auto"
    validation_ratio: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description=(
                "Fraction of the records held out for validation. Must be in [0, 1]; 0 turns "
                "validation off, anything larger reports an evaluation loss during training."
            ),
        ),
    ] = 0.0
    validation_steps: Annotated[
        int,
        Field(gt=0, description="Optimizer steps between two validation passes. Must be > 0."),
    ] = 15
    pretrained_model: Annotated[
        str,
        Field(
            max_length=4096,
            description=(
                "Base model to fine-tune: a Hugging Face Hub id or a local path. Defaults to "
                "SmolLM3-3B. Only load models from sources you trust."
            ),
            json_schema_extra={"minLength": 1},
        ),
    ] = "HuggingFaceTB/SmolLM3-3B"
    quantize_model: Annotated[
        bool,
        Field(
            description=(
                "Load the frozen base model quantized (see quantization_scheme) and train a QLoRA "
                "adapter on it. Cuts GPU memory, may cost some accuracy."
            ),
        ),
    ] = False
    quantization_bits: Annotated[
        Literal[4, 8],
        Field(
            description=(
                "Deprecated, use quantization_scheme. Bit width used when quantization_scheme is "
                "unset: 4 means bnb-4bit, 8 means bnb-8bit."
            ),
            json_schema_extra={"deprecated": True},
        ),
    ] = 8
    quantization_scheme: Annotated[
        QuantizationScheme | None,
        Field(
            description=(
                "Quantization scheme used when quantize_model is true: bnb-4bit, bnb-8bit, fp8, "
                "nvfp4 or mxfp4. Unset falls back to quantization_bits. peft_implementation loftq "
                "needs a bitsandbytes scheme."
            ),
        ),
    ] = None
    peft_implementation: Annotated[
        str,
        Field(
            max_length=256,
            description=(
                "Parameter-efficient fine-tuning method. With quantize_model false every value "
                "trains plain LoRA; with quantize_model true the quantized base is prepared for "
                "k-bit training (QLoRA), and exactly 'loftq' (lower case) asks for LoftQ, which "
                "trains QLoRA, as in Safe Synthesizer (peft drops its LoftQConfig). The usual "
                "values are 'lora', 'QLORA' and 'loftq'."
            ),
        ),
    ] = "QLORA"
    max_vram_fraction: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description=(
                "Share of each GPU's memory training may use; raise it to fit longer sequences. "
                "Must be in [0, 1]."
            ),
        ),
    ] = 0.8
    attn_implementation: Annotated[
        str,
        Field(
            max_length=256,
            description=(
                "Attention kernel used when loading the model: 'sdpa' (PyTorch scaled dot-product "
                "attention, the portable default), 'eager', 'flash_attention_2', "
                "'flash_attention_3', or a Hugging Face Kernels Hub path such as "
                "'kernels-community/flash-attn2'."
            ),
            json_schema_extra={"minLength": 1},
        ),
    ] = "sdpa"

    # Values Safe Synthesizer accepts but cannot train with: refused here with what would fail.

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(
                f"must be one of {', '.join(LR_SCHEDULERS)}: transformers' TrainingArguments "
                f"refuses {value!r}"
            )
        return value

    @field_validator("lora_target_modules")
    @classmethod
    def _some_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one module: peft has nothing to adapt otherwise")
        return value

    @field_validator("pretrained_model")
    @classmethod
    def _named_model(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty: no model can be loaded from ''")
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _named_attention(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty: transformers refuses attn_implementation ''")
        return value

    @field_validator("quantization_scheme", mode="before")
    @classmethod
    def _scheme_value(cls, value: Any) -> Any:
        """The scheme's string value, as the wire carries it (the model is strict)."""
        if value is None or isinstance(value, QuantizationScheme):
            return value
        if isinstance(value, str) and value in QuantizationScheme._value2member_map_:
            return QuantizationScheme(value)
        names = ", ".join(QuantizationScheme)
        raise ValueError(f"must be one of {names} (or null), got {value!r}")

    @model_validator(mode="after")
    def _warmup_ratio_alias(self) -> TrainingHyperparams:
        """The deprecated warmup_ratio sets warmup_steps when warmup_steps itself is not set."""
        if self.warmup_ratio is not None and "warmup_steps" not in self.model_fields_set:
            self.warmup_steps = self.warmup_ratio
        return self

    @cel_rule(
        _warmup_cel("warmup_steps"), f"warmup_steps {WARMUP_RULE}", field_path=".warmup_steps"
    )
    def _warmup_steps_usable(self) -> bool:
        return is_valid_warmup(self.warmup_steps)

    @cel_rule(
        _warmup_cel("warmup_ratio"), f"warmup_ratio {WARMUP_RULE}", field_path=".warmup_ratio"
    )
    def _warmup_ratio_usable(self) -> bool:
        return self.warmup_ratio is None or is_valid_warmup(self.warmup_ratio)

    @cel_rule(
        "!self.quantize_model || self.peft_implementation != 'loftq'"
        " || !has(self.quantization_scheme) || self.quantization_scheme in ['bnb-4bit', 'bnb-8bit']",
        "peft_implementation loftq cannot be used with quantization_scheme {quantization_scheme}: "
        "LoftQ needs a bitsandbytes scheme (bnb-4bit or bnb-8bit), and Safe Synthesizer's LoRA "
        "setup fails on any other",
        field_path=".quantization_scheme",
    )
    def _loftq_needs_bitsandbytes(self) -> bool:
        scheme = self.resolved_quantization_scheme
        return self.peft_method != "loftq" or scheme is None or scheme.is_bitsandbytes

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step: batch_size x gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def peft_method(self) -> Literal["lora", "qlora", "loftq"]:
        """The adapter training builds, decided the way Safe Synthesizer decides it: LoRA on an
        unquantized base whatever peft_implementation says; on a quantized base QLoRA, or 'loftq'
        when peft_implementation is exactly 'loftq' (which trains QLoRA too, as there: see
        finetune_trainer.adapters)."""
        if not self.quantize_model:
            return "lora"
        return "loftq" if self.peft_implementation == "loftq" else "qlora"

    @property
    def resolved_quantization_scheme(self) -> QuantizationScheme | None:
        """The scheme training uses: None unless quantize_model; else the explicit scheme, or the
        one the deprecated quantization_bits names."""
        if not self.quantize_model:
            return None
        if self.quantization_scheme is not None:
            return self.quantization_scheme
        return QuantizationScheme.from_alias(self.quantization_bits)

    @property
    def lora_alpha(self) -> int:
        """LoRA alpha as Safe Synthesizer computes it: int(lora_alpha_over_r x lora_r)."""
        return int(self.lora_alpha_over_r * self.lora_r)
