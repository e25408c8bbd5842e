"""One training run, start to finish: check, load, train (resuming if possible), save.

The same code runs in a single process and in each data-parallel worker (see distributed.py):
the plan counts the workers, each loads the model on its own device, and only rank 0 prepares
the checkpoint directory, reports progress and saves the outputs. `preflight` is what the
launcher checks before it starts the workers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.trainer_config import TrainerConfig
from finetune_trainer import checkpoints, data, distributed
from finetune_trainer.adapters import apply_peft, check_target_modules
from finetune_trainer.cadence import CheckpointCadence
from finetune_trainer.distributed import Worker
from finetune_trainer.errors import InvalidInputError, TrainingInterruptedError
from finetune_trainer.hardware import Device, check_hardware, check_workers, limit_gpu_memory
from finetune_trainer.modeling import (
    ModelSource,
    apply_rope_scaling,
    empty_model,
    load_model,
    load_tokenizer,
    read_config,
    resolve_model_source,
)
from finetune_trainer.plan import CHECKPOINT_TIME_SHARE, Plan, make_plan
from finetune_trainer.report import StatusReporter
from finetune_trainer.summary import RunResult, loaded_facts, save_outputs, summarize
from finetune_trainer.training import (
    ProgressCallback,
    build_trainer,
    get_training_arguments,
    last_logged,
    seed_everything,
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
) -> data.Tokenized:
    source = config.spec.dataset
    fields = data.Fields.from_source(source)
    tokenized = data.tokenize_records(records, tokenizer, fields, source.max_sequence_length)
    if not tokenized.examples:
        raise InvalidInputError(
            f"dataset {config.paths.dataset}: no record has a token to learn within "
            f"maxSequenceLength {source.max_sequence_length}"
        )
    return tokenized


def prepare(config: TrainerConfig, world_size: int = 1) -> Prepared:
    """Read the dataset (before the model: a bad file fails fast, without a download), then
    resolve the model source, its config, the tokenizer, the examples, the RoPE scaling (by the
    longest record) and the plan for `world_size` data-parallel workers."""
    spec = config.spec
    records = get_dataset(config)
    model = resolve_model_source(spec, config.paths.model)
    model_config = read_config(model, spec)
    tokenizer = load_tokenizer(model, spec)
    tokenized = tokenize_dataset(config, records, tokenizer)
    rope = apply_rope_scaling(model_config, spec, tokenized.longest)
    plan = make_plan(spec.training, len(tokenized.examples), world_size, rope)
    train, validation = data.split(tokenized.examples, plan.validation_records)
    return Prepared(plan, tokenizer, train, validation, model, model_config, rope)


def preflight(config: TrainerConfig, processes: int, world_size: int | None = None) -> Plan:
    """Everything that can be checked without the weights, done once before data-parallel
    workers start (each worker checks again): the hardware for the scheme and the `processes`
    of this pod, the dataset, the model's config and tokenizer, the plan for `world_size` workers
    in all (default: `processes`; more with several pods), and the LoRA target modules (on the
    model built without weights)."""
    training = config.spec.training
    device = check_hardware(training.resolved_quantization_scheme, config.min_compute_capability)
    check_workers(device, processes)
    ready = prepare(config, world_size or processes)
    skeleton = empty_model(ready.model, config.spec, ready.model_config)
    if skeleton is not None:
        check_target_modules(skeleton, training.lora_target_modules)
    log.info("plan: %s", ready.plan.describe())
    return ready.plan


def get_trainer(
    config: TrainerConfig, ready: Prepared, model: Any, device: Device, worker: Worker
) -> Any:
    """The transformers Trainer over the planned records, with the progress callback (status
    reports from rank 0 only) and the checkpoint cadence (periodic checkpoints within
    CHECKPOINT_TIME_SHARE of the time; for data-parallel workers, the agreed stop on SIGTERM)."""
    tokenizer = ready.tokenizer
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id or 0
    reporter = StatusReporter.from_env() if worker.is_main else None
    callbacks: list[Any] = [
        ProgressCallback(ready.plan, reporter),
        CheckpointCadence(CHECKPOINT_TIME_SHARE, distributed=worker.distributed),
    ]
    return build_trainer(
        model=model,
        args=get_training_arguments(
            config.spec.training, ready.plan, device, config.paths.checkpoint_dir
        ),
        tokenizer=None,  # the outputs hold it once; each checkpoint would save it again
        train_dataset=data.PlannedRecords(ready.train, ready.plan.records),
        eval_dataset=data.ExampleList(ready.validation) if ready.validation else None,
        collator=data.Collator(pad),
        callbacks=callbacks,
    )


def fingerprint(config: TrainerConfig, ready: Prepared) -> dict[str, Any]:
    """What the checkpoints belong to: another value means they cannot be continued. The plan
    includes the world size (another one: another step count and data order); a world size of 1
    is left out, so single-process checkpoints written before it existed still resume."""
    plan = ready.plan.as_dict()
    if plan["world_size"] == 1:
        del plan["world_size"]
    return {
        "training": config.spec.training.model_dump(mode="json"),
        "dataset": config.spec.dataset.model_dump(mode="json", by_alias=True),
        "model": ready.model.name,
        "plan": plan,
    }


def resume_point(
    trainer: Any, config: TrainerConfig, ready: Prepared, worker: Worker
) -> str | None:
    """The checkpoint to resume from. Rank 0 alone drops checkpoints of another plan and records
    this one; the other workers wait for it, then read the newest checkpoint."""
    directory = config.paths.checkpoint_dir
    if not worker.distributed:
        return checkpoints.prepare(directory, fingerprint(config, ready))
    with trainer.args.main_process_first(local=False, desc="checkpoint directory"):
        if worker.is_main:
            return checkpoints.prepare(directory, fingerprint(config, ready))
        return checkpoints.latest_checkpoint(directory)


def run(config: TrainerConfig) -> RunResult:
    """Check, load, train (resuming from the newest checkpoint), save; the run's Result."""
    started = time.monotonic()
    worker = distributed.current()
    training = config.spec.training
    scheme = training.resolved_quantization_scheme
    device = check_hardware(scheme, config.min_compute_capability)
    mine = device.for_worker(worker.local_rank, worker.local_world_size)
    ready = prepare(config, worker.world_size)
    log.info("plan: %s", ready.plan.describe())
    limit_gpu_memory(mine, training.max_vram_fraction)
    base = load_model(ready.model, config.spec, ready.model_config, mine, scheme)
    loaded = loaded_facts(base)
    seed_everything()  # the LoRA matrices' initialisation too: identical runs give identical adapters
    model, adapter = apply_peft(base, training)
    trainer = get_trainer(config, ready, model, mine, worker)
    resume = resume_point(trainer, config, ready, worker)
    # Read now: the checkpoint may be rotated away (save_total_limit) before training ends.
    resumed_from = checkpoints.checkpoint_step(Path(resume)) if resume else None
    if resume is not None:
        log.info("resuming from %s", resume)
    with checkpoints.without_model_card(model):
        trainer.train(resume_from_checkpoint=resume)
    if worker.distributed:  # rank 0's last checkpoint is complete before anyone looks for it
        trainer.accelerator.wait_for_everyone()
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
        resumed_from_step=resumed_from,
    )
    if worker.is_main:
        facts = {**loaded, "peft": adapter, "device": device, "resumed_from": resume}
        summary = summarize(config, ready, result, facts)
        save_outputs(config.paths.output, model, ready.tokenizer, summary)
    return result
