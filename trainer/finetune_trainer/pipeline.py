"""One training run, start to finish: check, load, train (resuming if possible), save."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.trainer_config import TrainerConfig
from finetune_trainer import checkpoints, data
from finetune_trainer.adapters import apply_peft
from finetune_trainer.errors import InvalidInputError, TrainingInterruptedError
from finetune_trainer.hardware import Device, check_hardware, limit_gpu_memory
from finetune_trainer.modeling import (
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from finetune_trainer.plan import Plan, make_plan
from finetune_trainer.report import StatusReporter
from finetune_trainer.summary import RunResult, loaded_facts, save_outputs, summarize
from finetune_trainer.training import (
    ProgressCallback,
    build_trainer,
    get_training_arguments,
    last_logged,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything loaded and resolved before the model weights are."""

    plan: Plan
    tokenizer: Any
    train: list[data.Example]
    validation: list[data.Example]
    model: ModelSource
    model_config: Any
    rope_factor: int | None


def get_dataset(config: TrainerConfig) -> list[data.Record]:
    """Read the dataset file's records (the columns the spec names)."""
    source = config.spec.dataset
    fields = data.Fields.from_source(source)
    return data.read_records(config.paths.dataset, source.resolved_format, fields)


def tokenize_dataset(
    config: TrainerConfig, records: list[data.Record], tokenizer: Any
) -> list[data.Example]:
    source = config.spec.dataset
    fields = data.Fields.from_source(source)
    examples = data.tokenize(records, tokenizer, fields, source.max_sequence_length)
    if not examples:
        raise InvalidInputError(
            f"dataset {config.paths.dataset}: no record has a token to learn within "
            f"maxSequenceLength {source.max_sequence_length}"
        )
    return examples


def prepare(config: TrainerConfig) -> Prepared:
    """Read the dataset (before the model: a bad file fails fast, without a download), then
    resolve the model source, its config (RoPE), the tokenizer, the examples and the plan."""
    spec = config.spec
    records = get_dataset(config)
    model = resolve_model_source(spec, config.paths.model)
    model_config, rope = load_config(model, spec)
    tokenizer = load_tokenizer(model, spec)
    examples = tokenize_dataset(config, records, tokenizer)
    plan = make_plan(spec.training, len(examples), getattr(model_config, "model_type", None))
    train, validation = data.split(examples, plan.validation_records)
    return Prepared(plan, tokenizer, train, validation, model, model_config, rope)


def get_trainer(config: TrainerConfig, ready: Prepared, model: Any, device: Device) -> Any:
    """The transformers Trainer over the planned records, with the progress callback."""
    tokenizer = ready.tokenizer
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id or 0
    return build_trainer(
        model=model,
        args=get_training_arguments(
            config.spec.training, ready.plan, device, config.paths.checkpoint_dir
        ),
        tokenizer=tokenizer,
        train_dataset=data.PlannedRecords(ready.train, ready.plan.records),
        eval_dataset=data.ExampleList(ready.validation) if ready.validation else None,
        collator=data.Collator(pad),
        callback=ProgressCallback(ready.plan, StatusReporter.from_env()),
    )


def fingerprint(config: TrainerConfig, ready: Prepared) -> dict[str, Any]:
    """What the checkpoints belong to: another value means they cannot be continued."""
    return {
        "training": config.spec.training.model_dump(mode="json"),
        "dataset": config.spec.dataset.model_dump(mode="json", by_alias=True),
        "model": ready.model.name,
        "plan": ready.plan.as_dict(),
    }


def run(config: TrainerConfig) -> RunResult:
    """Check, load, train (resuming from the newest checkpoint), save; the run's Result."""
    started = time.monotonic()
    training = config.spec.training
    scheme = training.resolved_quantization_scheme
    device = check_hardware(scheme, config.min_compute_capability)
    ready = prepare(config)
    log.info("plan: %s", ready.plan.describe())
    limit_gpu_memory(device, training.max_vram_fraction)
    base = load_model(ready.model, config.spec, ready.model_config, device, scheme)
    loaded = loaded_facts(base)
    model, adapter = apply_peft(base, training, scheme, ready.model.path)
    trainer = get_trainer(config, ready, model, device)
    resume = checkpoints.prepare(config.paths.checkpoint_dir, fingerprint(config, ready))
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    step = trainer.state.global_step
    if step < ready.plan.steps:
        latest = checkpoints.latest_checkpoint(config.paths.checkpoint_dir)
        raise TrainingInterruptedError(
            f"training stopped at step {step} of {ready.plan.steps}; a retry resumes from "
            f"{Path(latest).name if latest else 'the start'}"
        )
    history = trainer.state.log_history
    result = RunResult(
        steps=step,
        records_seen=ready.plan.records_after(step),
        final_loss=last_logged(history, "loss"),
        eval_loss=last_logged(history, "eval_loss"),
        duration_seconds=round(time.monotonic() - started, 3),
    )
    facts = {**loaded, "peft": adapter, "device": device, "resumed_from": resume}
    save_outputs(
        config.paths.output, model, ready.tokenizer, summarize(config, ready, result, facts)
    )
    return result
