"""The run plan: how the spec's 'auto' values and the derived counts are resolved. No torch.

Learning rate ("auto")
    As Safe Synthesizer 0.1.16 resolves it (`AutoConfigResolver._determine_learning_rate` with
    `ModelMetadata._resolve_model_class`): the first of MODEL_CLASSES whose name occurs in
    spec.training.pretrained_model (case-insensitive substring, in that order) gives the rate:
    1e-4 for Mistral, 5e-4 for every other class. A name that contains none of them is an error
    there, and so here (set a number instead). The name is matched, not the model's config:
    "meta-llama/Llama-3.2-1B" contains none of the names ("llama32" is one), so it needs a number.

Records ("auto")
    As Safe Synthesizer resolves it (`choose_num_input_records_to_sample`): 25,000 x the RoPE
    scaling factor that 'auto' resolved to, or 25,000 when rope_scaling_factor is a number
    (Safe Synthesizer multiplies by an auto-resolved factor only). The dataset size does not
    matter: a small split is repeated, a large one sampled.

Optimizer steps
    ceil(records / (effective_batch_size x world_size)), where effective_batch_size = batch_size x
    gradient_accumulation_steps is per device, and world_size is the number of data-parallel
    workers (1 process per GPU; 1 without distributed training). One optimizer step consumes
    effective_batch_size records on every worker, effective_batch_size x world_size in all (the
    global batch). The records are the training split repeated (each pass in a new seeded order)
    and cut at `records`, so the last step may see a partial batch; records_after(step) and the
    epochs count global batches.

World size
    Part of the plan, so part of the checkpoints' fingerprint: a run restarted with another world
    size has another step count and data order, and starts over instead of resuming checkpoints
    of the other plan (they are removed, with a warning naming them).

Warmup
    spec.training.warmup_steps goes to transformers unchanged, as Safe Synthesizer hands it over
    (TrainingArguments.warmup_steps), and transformers reads it: 0 is no warmup, a value below 1
    is a ratio, ceil(warmup_steps x steps), and a value from 1 on is int(warmup_steps) steps, even
    beyond the run's length. The plan records that count (0 for the schedulers without a warmup
    phase: constant, reduce_lr_on_plateau, greedy).

Validation split
    round(validation_ratio x records), at least 1 when the ratio is above 0; the rest trains.

RoPE scaling factor
    An integer n > 1 stretches the context to n x the model's native max_position_embeddings; 1
    leaves the model as it is. 'auto' is Safe Synthesizer's rule
    (`choose_rope_scaling_factor`): ceil(longest example's tokens / 12,288), at most 6, where
    12,288 is its base context of 2,048 tokens x its largest factor, 6; a factor of 1 scales
    nothing. Safe Synthesizer estimates the longest example from its tabular records (characters
    per token, column names); the records here are text, so the tokenizer counts them, each
    record whole, before truncation to dataset.maxSequenceLength. (The model refuses null, as
    Safe Synthesizer does; None here means no scaling.)

Checkpoints
    Every ceil(steps / 20) optimizer steps (at most 250 steps apart), so a restart loses at most
    5% of the run, unless saving that often would take more than 1% of the time
    (CHECKPOINT_TIME_SHARE): then periodic checkpoints are farther apart (cadence.py, measured
    while training); the final step and a checkpoint on SIGTERM are always saved; the 2 newest
    checkpoints are kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from finetune_api.training import TrainingHyperparams
from finetune_trainer.errors import InvalidInputError

# Safe Synthesizer's model classes in the order it matches them, with their auto learning rate
# (ModelMetadata.default_learning_rate: 5e-4, Mistral overrides it with 1e-4).
MODEL_CLASSES: tuple[tuple[str, float], ...] = (
    ("TinyLlama", 5e-4),
    ("Qwen", 5e-4),
    ("Llama32", 5e-4),
    ("SmolLM2", 5e-4),
    ("SmolLM3", 5e-4),
    ("Mistral", 1e-4),
    ("Nemotron", 5e-4),
    ("Granite", 5e-4),
)

AUTO_RECORDS_PER_ROPE_FACTOR = 25_000

CHECKPOINTS_PER_RUN = 20
MAX_SAVE_STEPS = 250
CHECKPOINT_TIME_SHARE = 0.01  # the most of the time periodic checkpoints may take
SAVE_TOTAL_LIMIT = 2
LOG_POINTS_PER_RUN = 100

# Schedulers whose learning rate has no warmup phase in transformers.
NO_WARMUP_SCHEDULERS = frozenset({"constant", "reduce_lr_on_plateau", "greedy"})
# Schedulers that step on the validation loss: they need a validation split.


def model_class(pretrained_model: str) -> str | None:
    """The first of MODEL_CLASSES whose name occurs in `pretrained_model`, ignoring case."""
    name = pretrained_model.lower()
    return next((cls for cls, _ in MODEL_CLASSES if cls.lower() in name), None)


def resolve_learning_rate(setting: float | Literal["auto"], pretrained_model: str) -> float:
    """The peak learning rate: the explicit value, else the rate of the model's class (see the
    module docstring); an InvalidInputError when 'auto' meets a name of no class."""
    if setting != "auto":
        return float(setting)
    cls = model_class(pretrained_model)
    if cls is None:
        names = ", ".join(name for name, _ in MODEL_CLASSES)
        raise InvalidInputError(
            f"spec.training.learning_rate: 'auto' needs a pretrained_model whose name contains "
            f"one of {names} (as Safe Synthesizer matches it), and {pretrained_model!r} contains "
            "none: set learning_rate to a number"
        )
    return dict(MODEL_CLASSES)[cls]


def resolve_records(
    setting: int | Literal["auto"], rope_setting: int | Literal["auto"], rope: int | None
) -> int:
    """Records the model sees in total (see the module docstring for 'auto'); `rope` is the
    factor applied (None: unscaled), `rope_setting` the spec's rope_scaling_factor."""
    if setting != "auto":
        return setting
    factor = (rope or 1) if rope_setting == "auto" else 1
    return AUTO_RECORDS_PER_ROPE_FACTOR * factor


def optimizer_steps(records: int, effective_batch_size: int) -> int:
    """ceil(records / effective_batch_size)."""
    return -(-records // effective_batch_size)


def warmup_steps(setting: float, total_steps: int, scheduler: str) -> int:
    """The warmup steps transformers derives from `setting` (TrainingArguments.get_warmup_steps):
    int(setting) from 1 on, ceil(total_steps x setting) below; 0 for schedulers without warmup."""
    if scheduler in NO_WARMUP_SCHEDULERS:
        return 0
    return int(setting) if setting >= 1 else math.ceil(total_steps * setting)


def scheduler_kwargs(scheduler: str, total_steps: int, warmup: int) -> dict[str, float | int]:
    """Extra arguments the scheduler needs: min-lr cosines end at 10% of the peak, and
    warmup_stable_decay decays over the last 10% of the steps."""
    if scheduler in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        return {"min_lr_rate": 0.1}
    if scheduler == "warmup_stable_decay":
        return {"num_decay_steps": max(0, min(math.ceil(0.1 * total_steps), total_steps - warmup))}
    return {}


def validation_count(records: int, ratio: float) -> int:
    """Records held out for validation: round(ratio x records), at least 1 if ratio > 0."""
    if ratio <= 0:
        return 0
    return max(1, round(ratio * records))


def save_steps(total_steps: int) -> int:
    """Optimizer steps between two checkpoints."""
    return max(1, min(math.ceil(total_steps / CHECKPOINTS_PER_RUN), MAX_SAVE_STEPS))


def logging_steps(total_steps: int) -> int:
    """Optimizer steps between two logged losses: about LOG_POINTS_PER_RUN points per run."""
    return max(1, total_steps // LOG_POINTS_PER_RUN)


# Safe Synthesizer's defaults: DEFAULT_BASE_SEQ_LENGTH x MAX_ROPE_SCALING_FACTOR
AUTO_ROPE_CONTEXT = 2048 * 6
MAX_ROPE_SCALING_FACTOR = 6


def rope_factor(setting: int | Literal["auto"] | None, longest_tokens: int) -> int | None:
    """The RoPE scaling factor to apply, or None for no scaling (see the module docstring);
    `longest_tokens` is the longest record's token count, before truncation."""
    if setting is None:
        return None
    if setting == "auto":
        factor = min(math.ceil(longest_tokens / AUTO_ROPE_CONTEXT), MAX_ROPE_SCALING_FACTOR)
        return factor if factor > 1 else None
    return setting if setting > 1 else None


@dataclass(frozen=True)
class Plan:
    """Every count and rate of the run, resolved by the rules above."""

    dataset_records: int
    train_records: int
    validation_records: int
    records: int
    effective_batch_size: int
    steps: int
    warmup_steps: int
    learning_rate: float
    learning_rate_source: str
    scheduler_kwargs: dict[str, float | int]
    save_steps: int
    logging_steps: int
    world_size: int = 1

    @property
    def global_batch_size(self) -> int:
        """Records one optimizer step consumes across all the workers."""
        return self.effective_batch_size * self.world_size

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.records} records ({self.train_records} train, {self.validation_records} "
            f"validation) -> {self.steps} steps of {self._batch()}; learning rate "
            f"{self.learning_rate:g} ({self.learning_rate_source}); warmup {self.warmup_steps}"
        )

    def _batch(self) -> str:
        if self.world_size == 1:
            return str(self.effective_batch_size)
        return (
            f"{self.global_batch_size} ({self.effective_batch_size} per device x "
            f"{self.world_size} workers)"
        )

    def records_after(self, step: int) -> int:
        """Training records consumed after `step` optimizer steps (by all the workers)."""
        return min(step * self.global_batch_size, self.records)


def make_plan(
    training: TrainingHyperparams,
    dataset_records: int,
    world_size: int = 1,
    rope: int | None = None,
) -> Plan:
    """Resolve the run's counts from the hyperparameters, the dataset size, the number of
    data-parallel workers and the RoPE scaling factor applied (None: unscaled)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    validation = validation_count(dataset_records, training.validation_ratio)
    train = dataset_records - validation
    if train < 1:
        raise InvalidInputError(
            f"spec.training.validation_ratio {training.validation_ratio} holds out {validation} of "
            f"the {dataset_records} usable records: none is left to train on"
        )
    records = resolve_records(
        training.num_input_records_to_sample, training.rope_scaling_factor, rope
    )
    steps = optimizer_steps(records, training.effective_batch_size * world_size)
    warmup = warmup_steps(training.warmup_steps, steps, training.lr_scheduler)
    learning_rate = resolve_learning_rate(training.learning_rate, training.pretrained_model)
    if training.learning_rate == "auto":
        source = f"auto ({model_class(training.pretrained_model)})"
    else:
        source = "spec"
    return Plan(
        dataset_records=dataset_records,
        train_records=train,
        validation_records=validation,
        records=records,
        effective_batch_size=training.effective_batch_size,
        steps=steps,
        warmup_steps=warmup,
        learning_rate=learning_rate,
        learning_rate_source=source,
        scheduler_kwargs=scheduler_kwargs(training.lr_scheduler, steps, warmup),
        save_steps=save_steps(steps),
        logging_steps=logging_steps(steps),
        world_size=world_size,
    )
