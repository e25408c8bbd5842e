"""The transformers TrainingArguments and Trainer for a Plan, and the progress callback (when
checkpoints are written: cadence.py)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, set_seed

from finetune_api.resource import Progress
from finetune_api.training import TrainingHyperparams
from finetune_trainer import plan as rules
from finetune_trainer.hardware import Device
from finetune_trainer.plan import Plan
from finetune_trainer.report import StatusReporter, now_rfc3339

log = logging.getLogger(__name__)

SEED = 42
OPTIMIZER = "paged_adamw_32bit"  # Safe Synthesizer's FIXED_RUNTIME_TRAINING_ARGS
EVAL_BATCH_SIZE = 2  # per_device_eval_batch_size, the same


def seed_everything() -> None:
    """Seed Python, NumPy and torch (as the Trainer does) before anything random is created."""
    set_seed(SEED)


def get_training_arguments(
    training: TrainingHyperparams, plan: Plan, device: Device, checkpoint_dir: str
) -> Any:
    """TrainingArguments: the resolved schedule, step-based eval and checkpoints, and what Safe
    Synthesizer's backend fixes (FIXED_RUNTIME_TRAINING_ARGS and _configure_standard_training):
    bitsandbytes' paged 32-bit AdamW (`paged_adamw_32bit`: on a GPU the state of a tensor of over
    1e5 elements lives in paged memory, the smaller LoRA matrices' in device memory; on CPU
    bitsandbytes runs it unpaged),
    gradient checkpointing with transformers' default kwargs (non-reentrant), evaluation batches
    of EVAL_BATCH_SIZE, bf16 (on GPUs; float32 on CPU, where only tests and the demo run), and
    the defaults it keeps (max_grad_norm 1.0, seed 42).

    With several data-parallel workers (plan.world_size > 1) the Trainer runs DDP over the
    process group it sets up (NCCL on GPUs, gloo on CPU): every parameter that trains is a LoRA
    parameter used in every step, so DDP does not look for unused ones (as Safe Synthesizer sets
    it; the non-reentrant checkpointing works with DDP). transformers' own SIGTERM checkpoint
    (enable_jit_checkpoint) stops each process on its own, at steps that may differ; the workers
    use cadence.CheckpointCadence instead."""
    from transformers import TrainingArguments

    validate = plan.validation_records > 0
    return TrainingArguments(
        output_dir=checkpoint_dir,
        max_steps=plan.steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        optim=OPTIMIZER,
        activation_checkpointing=True,  # Safe Synthesizer's gradient_checkpointing=True
        learning_rate=plan.learning_rate,
        weight_decay=training.weight_decay,
        lr_scheduler_type=training.lr_scheduler,
        lr_scheduler_kwargs=plan.scheduler_kwargs,
        warmup_steps=training.warmup_steps,  # as Safe Synthesizer passes it; see plan.py
        eval_strategy="steps" if validate else "no",
        eval_steps=training.validation_steps if validate else None,
        logging_strategy="steps",
        logging_steps=plan.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=rules.SAVE_TOTAL_LIMIT,
        enable_jit_checkpoint=plan.world_size == 1,
        ddp_find_unused_parameters=False,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        bf16=device.bf16,
        use_cpu=not device.cuda,
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
    )


class ProgressCallback(TrainerCallback):  # type: ignore[misc]
    """Logs each logged step as one line, reports status.progress (rate-limited, the final report
    always), and makes sure the final step's loss is logged."""

    def __init__(self, plan: Plan, reporter: StatusReporter | None) -> None:
        self.plan = plan
        self.reporter = reporter
        self.loss: float | None = None
        self.eval_loss: float | None = None

    def progress(self, step: int) -> Progress:
        plan = self.plan
        return Progress(
            step=step,
            total_steps=plan.steps,
            epoch=round(plan.records_after(step) / plan.train_records, 4),
            loss=_display(self.loss),
            eval_loss=_display(self.eval_loss),
            percent=min(100, 100 * step // plan.steps),
            update_time=now_rfc3339(),
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for entry in state.log_history:  # restored from a checkpoint on resume
            self._remember(entry)
        if state.global_step:
            log.info("resumed at step %d/%d", state.global_step, self.plan.steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.plan.steps:
            control.should_log = True  # the final loss is always logged
        elif self.reporter is not None:
            self.reporter.report(self.progress(state.global_step))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        self._remember(logs)
        step = state.global_step
        parts = [f"step {step}/{self.plan.steps}"]
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.6g}")
        if len(parts) > 1:
            log.info(" ".join(parts))
        if self.reporter is not None and ("loss" in logs or "eval_loss" in logs):
            self.reporter.report(self.progress(step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.reporter is not None:
            self.reporter.report(self.progress(state.global_step), force=True)
            self.reporter.flush()

    def _remember(self, entry: dict[str, Any]) -> None:
        if "loss" in entry:
            self.loss = float(entry["loss"])
        if "eval_loss" in entry:
            self.eval_loss = float(entry["eval_loss"])


def _display(loss: float | None) -> float | None:
    """Four decimals are what `kubectl get ftj` has room for; the result keeps full precision."""
    return None if loss is None else round(loss, 4)


def build_trainer(
    *,
    model: Any,
    args: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    collator: Any,
    callbacks: list[Any],
) -> Any:
    from transformers import PrinterCallback, Trainer

    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback logs one line per logged step
    return trainer


def last_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    """The last value of `key` in the Trainer's log history."""
    for entry in reversed(log_history):
        if key in entry:
            return float(entry[key])
    return None
