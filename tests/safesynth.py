"""Run one `training:` block through NeMo Safe Synthesizer's own parameters model and through ours,
and judge the two outcomes against the deliberate differences README.md lists.

Safe Synthesizer's side is `SafeSynthesizerParameters.model_validate({"training": block})`, its
full parameters model (the unknown-field policy lives there). Ours is the whole FineTuneJob spec
with the block as `spec.training`, so the spec-level rules count too.

Two kinds of deliberate differences:
- READINGS: the model reads a block as the Kubernetes API server does (finetune_api.rules), which
  Safe Synthesizer's lax pydantic reading does not: JSON types are strict, strings and lists are
  bounded (for CEL's cost), and a null on a field that is not nullable means "unset".
- DIFFERENCES: blocks Safe Synthesizer accepts and cannot run, which we refuse up front.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from finetune_api import FineTuneJobSpec, format_validation_error
from finetune_api.training import LR_SCHEDULERS

SPEC: dict[str, Any] = {
    "dataset": {"claimName": "data", "path": "train.jsonl"},
    "output": {"claimName": "out", "path": "adapter"},
}
BITSANDBYTES = ("bnb-4bit", "bnb-8bit")


@dataclass(frozen=True)
class Outcome:
    """Accepted with these values, or refused with this message."""

    values: dict[str, Any] | None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.values is not None


def _values(model: Any) -> dict[str, Any]:
    return {**model.model_dump(mode="json"), "warmup_ratio": model.warmup_ratio}


def safe_synthesizer(block: Any) -> Outcome:
    from nemo_safe_synthesizer.config import SafeSynthesizerParameters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warmup_ratio's DeprecationWarning
        try:
            # replace_pii: null only spares parsing its default YAML on every call (most of the
            # time otherwise); no training rule looks at it.
            params = SafeSynthesizerParameters.model_validate(
                {"training": block, "replace_pii": None}
            )
        except (ValidationError, ValueError, TypeError) as exc:
            return Outcome(None, str(exc))
        return Outcome(_values(params.training))


def ours(block: Any) -> Outcome:
    try:
        spec = FineTuneJobSpec.model_validate({**SPEC, "training": block})
    except ValidationError as exc:
        return Outcome(None, format_validation_error(exc))
    return Outcome(_values(spec.training))


@dataclass(frozen=True)
class Difference:
    """A block Safe Synthesizer accepts and we refuse, because its run would fail anyway.

    `applies` looks at the values Safe Synthesizer accepted; `message` is a fragment of our error.
    The name is the README's ("Differences from Safe Synthesizer").
    """

    name: str
    applies: Callable[[dict[str, Any]], bool]
    message: str


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "unknown lr_scheduler",
        lambda v: v["lr_scheduler"] not in LR_SCHEDULERS,
        "transformers' TrainingArguments refuses",
    ),
    Difference(
        "scheduler that needs validation, without validation",
        lambda v: (
            v["lr_scheduler"] in ("reduce_lr_on_plateau", "greedy") and v["validation_ratio"] == 0
        ),
        "transformers refuses this scheduler without evaluation",
    ),
    Difference(
        "empty lora_target_modules",
        lambda v: v["lora_target_modules"] == [],
        "must name at least one module",
    ),
    Difference(
        "empty pretrained_model",
        lambda v: v["pretrained_model"] == "",
        "no model can be loaded from ''",
    ),
    Difference(
        "empty attn_implementation",
        lambda v: v["attn_implementation"] == "",
        "transformers refuses attn_implementation ''",
    ),
    Difference(
        "loftq on a quantized base with a non-bitsandbytes scheme",
        lambda v: (
            v["quantize_model"] is True
            and v["peft_implementation"] == "loftq"
            and v["quantization_scheme"] not in (None, *BITSANDBYTES)
        ),
        "LoftQ needs a bitsandbytes scheme",
    ),
    Difference(
        "num_input_records_to_sample 0",
        lambda v: v["num_input_records_to_sample"] == 0,
        "num_input_records_to_sample 0 means no training step",
    ),
)


# The JSON types the CRD gives each field (after the API server's reading: a whole float is an
# integer). "auto" fields also take that one string.
_INTEGER = ("batch_size", "gradient_accumulation_steps", "lora_r", "validation_steps")
_NUMBER = (
    "weight_decay",
    "warmup_steps",
    "warmup_ratio",
    "lora_alpha_over_r",
    "validation_ratio",
    "max_vram_fraction",
)
_STRING = ("lr_scheduler", "pretrained_model", "peft_implementation", "attn_implementation")
NULLABLE = ("warmup_ratio", "quantization_scheme")
MAX_LENGTH = {"pretrained_model": 4096, "peft_implementation": 256, "attn_implementation": 256}
MAX_TARGETS, MAX_TARGET_LENGTH = 64, 256


def _is_integer(value: Any) -> bool:
    whole_float = isinstance(value, float) and value.is_integer() and abs(value) < 2**63
    return (isinstance(value, int) and not isinstance(value, bool)) or whole_float


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_type_fits(field: str, value: Any) -> bool:  # noqa: PLR0911
    """Whether the value has the JSON type the CRD gives the field (values checked elsewhere)."""
    if value is None:
        return True  # null: unset, or the null of a nullable field
    if field in _INTEGER or field == "quantization_bits":
        return _is_integer(value)
    if field in _NUMBER:
        return _is_number(value)
    if field in ("num_input_records_to_sample", "rope_scaling_factor"):
        return _is_integer(value) or value == "auto"
    if field == "learning_rate":
        return _is_number(value) or value == "auto"
    if field in (*_STRING, "quantization_scheme"):
        return isinstance(value, str)
    if field == "quantize_model":
        return isinstance(value, bool)
    if field == "lora_target_modules":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return True  # an unknown field: refused by both


def _too_long(field: str, value: Any) -> bool:
    if field in MAX_LENGTH:
        return isinstance(value, str) and len(value) > MAX_LENGTH[field]
    if field == "lora_target_modules" and isinstance(value, list):
        long_item = any(isinstance(i, str) and len(i) > MAX_TARGET_LENGTH for i in value)
        return len(value) > MAX_TARGETS or long_item
    return False


@dataclass(frozen=True)
class Reading:
    """How the model's reading of a block departs from Safe Synthesizer's. `refuses(block)`: we
    refuse whatever Safe Synthesizer does; else `read(block)` is what Safe Synthesizer is compared
    on."""

    name: str
    refuses: Callable[[dict[str, Any]], bool]
    read: Callable[[dict[str, Any]], dict[str, Any]]


def _unchanged(block: dict[str, Any]) -> dict[str, Any]:
    return block


def _never(block: dict[str, Any]) -> bool:
    return False


READINGS: tuple[Reading, ...] = (
    Reading(
        "strict JSON types",
        lambda b: not all(_json_type_fits(f, v) for f, v in b.items()),
        _unchanged,
    ),
    Reading(
        "bounded strings and lists",
        lambda b: any(_too_long(f, v) for f, v in b.items()),
        _unchanged,
    ),
    Reading(
        "null on a field that is not nullable means unset",
        _never,
        lambda b: {f: v for f, v in b.items() if v is not None or f in NULLABLE},
    ),
)


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types (NaN equals NaN), recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def disagreement(
    block: Any,
    differences: tuple[Difference, ...] = DIFFERENCES,
    readings: tuple[Reading, ...] = READINGS,
) -> str | None:
    """None when the two models agree on `block` (allowing only the listed readings and
    differences), else what differs."""
    mine = ours(block)
    if mine.error is not None and (
        not mine.error.startswith("spec.training") or "\n" in mine.error
    ):
        return f"our message does not name the field on one line: {mine.error!r}"
    if isinstance(block, dict):
        refusing = [r.name for r in readings if r.refuses(block)]
        if refusing:
            return f"readings {refusing} apply, but we accept" if mine.accepted else None
        for reading in readings:
            block = reading.read(block)
    theirs = safe_synthesizer(block)
    if theirs.values is None:
        return f"Safe Synthesizer refuses ({theirs.error}), we accept" if mine.accepted else None
    return _accepted_by_safe_synthesizer(theirs.values, mine, differences)


def _accepted_by_safe_synthesizer(
    values: dict[str, Any], mine: Outcome, differences: tuple[Difference, ...]
) -> str | None:
    expected = [d.name for d in differences if d.applies(values)]
    if expected:
        if mine.error is None:
            return f"listed differences {expected} apply, but we accept"
        messages = [d.message for d in differences if d.name in expected]
        if not any(m in mine.error for m in messages):
            return f"we refuse for another reason than {expected}: {mine.error}"
        return None
    if mine.values is None:
        return f"Safe Synthesizer accepts, we refuse: {mine.error}"
    if values.keys() != mine.values.keys():
        return f"fields differ: {sorted(values.keys() ^ mine.values.keys())}"
    diff = {
        k: (v, mine.values.get(k)) for k, v in values.items() if not same(v, mine.values.get(k))
    }
    return f"values differ (theirs, ours): {diff}" if diff else None


def safe_synthesizer_dumps() -> list[dict[str, Any]]:
    """`SafeSynthesizerParameters().model_dump()["training"]` and the same with every field set,
    each as model_dump() and as model_dump(mode="json") gives it."""
    from nemo_safe_synthesizer.config import SafeSynthesizerParameters

    from finetune_api import TrainingHyperparams

    every_field = {
        "num_input_records_to_sample": 4000,
        "batch_size": 2,
        "gradient_accumulation_steps": 4,
        "weight_decay": 0.02,
        "warmup_steps": 12,
        "lr_scheduler": "linear",
        "learning_rate": 0.0003,
        "lora_r": 24,
        "lora_alpha_over_r": 1.3,
        "lora_target_modules": ["q_proj", "v_proj", "up_proj"],
        "rope_scaling_factor": 2,
        "validation_ratio": 0.1,
        "validation_steps": 25,
        "pretrained_model": "meta-llama/Llama-3.2-1B",
        "quantize_model": True,
        "quantization_bits": 4,
        "quantization_scheme": "bnb-4bit",
        "peft_implementation": "loftq",
        "max_vram_fraction": 0.9,
        "attn_implementation": "eager",
    }
    # every field but warmup_ratio, which both leave out of dumps
    assert set(every_field) == set(TrainingHyperparams.model_fields) - {"warmup_ratio"}
    dumps = []
    for params in (
        SafeSynthesizerParameters(),
        SafeSynthesizerParameters.model_validate({"training": every_field}),
    ):
        dumps += [params.model_dump()["training"], params.model_dump(mode="json")["training"]]
    return dumps
