"""Run one `training:` block through NeMo Safe Synthesizer's own parameters model and through ours,
and judge the two outcomes against the deliberate differences README.md lists.

Safe Synthesizer's side is `SafeSynthesizerParameters.model_validate({"training": block})`, its
full parameters model (the unknown-field policy lives there). Ours is the whole FineTuneJob spec
with the block as `spec.training`, so the spec-level rules count too.
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


def disagreement(block: Any, differences: tuple[Difference, ...] = DIFFERENCES) -> str | None:
    """None when the two models agree on `block` (allowing only the listed differences), else
    what differs."""
    theirs, mine = safe_synthesizer(block), ours(block)
    if mine.error is not None and (
        not mine.error.startswith("spec.training") or "\n" in mine.error
    ):
        return f"our message does not name the field on one line: {mine.error!r}"
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
