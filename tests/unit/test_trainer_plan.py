"""The trainer's resolution rules: learning rate, records, steps, warmup, schedules, RoPE factor."""

from __future__ import annotations

import math

import pytest

from finetune_api import TrainingHyperparams
from finetune_api.training import LR_SCHEDULERS
from finetune_trainer import plan
from finetune_trainer.errors import InvalidInputError


def test_api_scheduler_list_matches_transformers() -> None:
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULERS) == {member.value for member in SchedulerType}


@pytest.mark.parametrize(
    ("setting", "model", "expected"),
    [
        (0.003, "acme/unknown", 0.003),  # explicit wins, whatever the model
        ("auto", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", 5e-4),
        ("auto", "mistralai/Mistral-7B-Instruct-v0.3", 1e-4),
        ("auto", "HuggingFaceTB/SmolLM3-3B", 5e-4),
        ("auto", "/models/unsloth-llama32-1b", 5e-4),  # a path names the class too
    ],
)
def test_learning_rate(setting: float | str, model: str, expected: float) -> None:
    assert plan.resolve_learning_rate(setting, model) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.2-1B", "acme/unknown", ""])
def test_auto_learning_rate_refuses_a_model_of_no_class(model: str) -> None:
    with pytest.raises(
        InvalidInputError,
        match=r"^spec.training.learning_rate: 'auto' needs a pretrained_model whose name contains "
        r"one of TinyLlama, .*, Granite .* contains none: set learning_rate to a number$",
    ):
        plan.resolve_learning_rate("auto", model)


@pytest.mark.parametrize(
    ("setting", "rope_setting", "rope", "expected"),
    [
        (500, "auto", 3, 500),  # explicit: may exceed the dataset (wraps around)
        ("auto", "auto", None, 25_000),  # auto RoPE left the model unscaled
        ("auto", "auto", 3, 75_000),  # 25,000 x the factor auto resolved to
        ("auto", 3, 3, 25_000),  # an explicit factor does not count (as in Safe Synthesizer)
        ("auto", 1, None, 25_000),
    ],
)
def test_records(
    setting: int | str, rope_setting: int | str, rope: int | None, expected: int
) -> None:
    assert plan.resolve_records(setting, rope_setting, rope) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("records", "batch", "steps"), [(1, 8, 1), (8, 8, 1), (9, 8, 2), (60, 6, 10), (61, 6, 11)]
)
def test_optimizer_steps_round_up(records: int, batch: int, steps: int) -> None:
    assert plan.optimizer_steps(records, batch) == steps == math.ceil(records / batch)


@pytest.mark.parametrize(
    ("setting", "total", "scheduler", "expected"),
    [
        (0.05, 100, "cosine", 5),
        (0.05, 10, "linear", 1),  # ceil(0.5)
        (0.25, 10, "linear", 3),  # ceil(2.5)
        (0.0, 10, "linear", 0),  # none
        (1.0, 10, "cosine", 1),  # from 1 on: a count of steps, not a ratio
        (2.0, 10, "cosine", 2),  # warmup_ratio 2 is 2 steps too, as in Safe Synthesizer
        (40.0, 10, "cosine", 40),  # longer than the run: transformers does not cap it
        (0.5, 10, "constant", 0),  # no warmup phase
        (0.5, 10, "reduce_lr_on_plateau", 0),
    ],
)
def test_warmup_steps(setting: float, total: int, scheduler: str, expected: int) -> None:
    assert plan.warmup_steps(setting, total, scheduler) == expected


@pytest.mark.parametrize("setting", [0, 0.01, 0.05, 0.25, 0.5, 0.999, 1, 2, 3.0, 17, 250])
@pytest.mark.parametrize("total", [1, 7, 10, 99, 1000])
def test_warmup_is_what_transformers_derives_from_safe_synthesizers_value(
    setting: float, total: int
) -> None:
    """Safe Synthesizer hands warmup_steps to TrainingArguments unchanged; the plan must count
    the warmup steps that transformers then schedules, and the trainer hands over the same value."""
    from transformers import TrainingArguments

    from finetune_trainer.hardware import Device
    from finetune_trainer.training import get_training_arguments

    training = TrainingHyperparams(
        warmup_steps=setting, lr_scheduler="linear", num_input_records_to_sample=total * 8
    )
    safe_synthesizer = TrainingArguments(output_dir="/tmp/unused", warmup_steps=setting)
    resolved = plan.make_plan(training, dataset_records=total)
    assert resolved.steps == total
    assert resolved.warmup_steps == safe_synthesizer.get_warmup_steps(total)
    ours = get_training_arguments(training, resolved, Device(gpus=(), bf16=False), "/tmp/unused")
    assert ours.warmup_steps == safe_synthesizer.warmup_steps == setting
    assert ours.get_warmup_steps(total) == resolved.warmup_steps


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_every_scheduler_builds_with_the_resolved_arguments(scheduler: str) -> None:
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    warmup = plan.warmup_steps(0.1, 40, scheduler)
    built = get_scheduler(
        scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=40,
        scheduler_specific_kwargs=plan.scheduler_kwargs(scheduler, 40, warmup),
    )
    assert built is not None


def test_validation_count() -> None:
    assert plan.validation_count(100, 0.0) == 0
    assert plan.validation_count(100, 0.05) == 5
    assert plan.validation_count(10, 0.01) == 1  # any ratio above 0 validates
    assert plan.validation_count(10, 1.0) == 10


def test_checkpoint_and_logging_cadence() -> None:
    assert plan.save_steps(10) == 1
    assert plan.save_steps(1250) == 63  # ~5% of the run
    assert plan.save_steps(100_000) == plan.MAX_SAVE_STEPS
    assert plan.logging_steps(40) == 1
    assert plan.logging_steps(2000) == 20


@pytest.mark.parametrize(
    ("setting", "longest", "expected"),
    [
        (None, 100_000, None),  # null: never
        (1, 100_000, None),  # factor 1 is no scaling
        (4, 100, 4),  # explicit: always
        ("auto", 0, None),
        ("auto", 2049, None),  # past a 2,048-token model, but Safe Synthesizer's base is 12,288
        ("auto", 12_288, None),
        ("auto", 12_289, 2),
        ("auto", 36_864, 3),
        ("auto", 61_441, 6),
        ("auto", 10**7, 6),  # capped at 6
    ],
)
def test_rope_factor(setting: int | str | None, longest: int, expected: int | None) -> None:
    assert plan.rope_factor(setting, longest) == expected  # type: ignore[arg-type]


def test_make_plan_resolves_everything() -> None:
    training = TrainingHyperparams(
        num_input_records_to_sample=60,
        batch_size=2,
        gradient_accumulation_steps=3,
        warmup_steps=0.25,
        validation_ratio=0.2,
        lr_scheduler="linear",
    )
    resolved = plan.make_plan(training, dataset_records=20)
    assert (resolved.validation_records, resolved.train_records) == (4, 16)
    assert (resolved.records, resolved.steps, resolved.warmup_steps) == (60, 10, 3)
    assert resolved.learning_rate == 5e-4  # the default pretrained_model is SmolLM3-3B
    assert resolved.learning_rate_source == "auto (SmolLM3)"
    assert resolved.records_after(3) == 18
    assert resolved.records_after(10) == 60  # the last batch is partial: 10 x 6 > 60


def test_make_plan_refuses_a_split_with_nothing_to_train() -> None:
    with pytest.raises(InvalidInputError, match=r"validation_ratio 1.0 holds out 5 of the 5"):
        plan.make_plan(TrainingHyperparams(validation_ratio=1.0), dataset_records=5)


@pytest.mark.parametrize(
    ("records", "batch", "accumulation", "world_size", "steps"),
    [
        (60, 2, 3, 1, 10),  # one process: ceil(60 / 6)
        (60, 2, 3, 2, 5),  # two workers: 12 records a step
        (61, 2, 3, 2, 6),  # the last global batch is partial
        (60, 2, 3, 4, 3),  # ceil(60 / 24)
        (7, 4, 1, 8, 1),  # fewer records than one global batch: still one step
    ],
)
def test_steps_count_every_worker(
    records: int, batch: int, accumulation: int, world_size: int, steps: int
) -> None:
    training = TrainingHyperparams(
        num_input_records_to_sample=records,
        batch_size=batch,
        gradient_accumulation_steps=accumulation,
        warmup_steps=0.25,
        lr_scheduler="linear",
    )
    resolved = plan.make_plan(training, dataset_records=20, world_size=world_size)
    assert resolved.steps == steps == math.ceil(records / (batch * accumulation * world_size))
    assert resolved.world_size == world_size
    assert resolved.effective_batch_size == batch * accumulation  # per device, as in the spec
    assert resolved.global_batch_size == batch * accumulation * world_size
    assert resolved.warmup_steps == math.ceil(0.25 * steps)  # of the (fewer) optimizer steps
    assert resolved.save_steps == plan.save_steps(steps)
    assert resolved.as_dict()["world_size"] == world_size


def test_records_and_epochs_after_a_step_count_the_global_batch() -> None:
    training = TrainingHyperparams(
        num_input_records_to_sample=76, batch_size=2, gradient_accumulation_steps=2
    )
    resolved = plan.make_plan(training, dataset_records=16, world_size=2)
    assert resolved.steps == 10
    assert resolved.records_after(1) == 8
    assert resolved.records_after(9) == 72
    assert resolved.records_after(10) == 76  # the last global batch is partial: 4 records
    assert resolved.describe().startswith(
        "76 records (16 train, 0 validation) -> 10 steps of 8 (4 per device x 2 workers)"
    )


def test_one_process_is_the_default_plan() -> None:
    training = TrainingHyperparams(num_input_records_to_sample=60, batch_size=2)
    default = plan.make_plan(training, dataset_records=20)
    assert default == plan.make_plan(training, dataset_records=20, world_size=1)
    assert default.world_size == 1
    assert "per device" not in default.describe()


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        plan.make_plan(TrainingHyperparams(), dataset_records=20, world_size=0)
