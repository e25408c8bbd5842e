"""When the trainer writes checkpoints (finetune_trainer.cadence): periodic ones within their share
of the time, the last step and SIGTERM always. The callback runs as the Trainer calls it, on
transformers' own TrainerControl and DefaultFlowCallback, with a clock the test moves."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerControl, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, TrainerState

from finetune_trainer.cadence import CheckpointCadence


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(
    cadence: CheckpointCadence,
    clock: Clock,
    max_steps: int,
    save_steps: int,
    *,
    step_s: float,
    save_s: float,
) -> list[int]:
    """The steps a Trainer would save at: DefaultFlowCallback's rule, then the cadence, each step
    taking step_s and each save save_s (the order of Trainer._maybe_log_save_evaluate)."""
    args = TrainingArguments(
        output_dir="unused", max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
        logging_strategy="no", report_to="none", use_cpu=True,
    )  # fmt: skip
    state = TrainerState(max_steps=max_steps, save_steps=save_steps, logging_steps=0, eval_steps=0)
    flow = DefaultFlowCallback()
    control = TrainerControl()
    saved = []
    cadence.on_train_begin(args, state, control)
    for step in range(1, max_steps + 1):
        clock.now += step_s
        state.global_step = step
        control = flow.on_step_end(args, state, control)
        cadence.on_step_end(args, state, control)
        if control.should_save:
            clock.now += save_s
            saved.append(step)
            cadence.on_save(args, state, control)
            control.should_save = False
        if control.should_training_stop:
            break
    cadence.on_train_end(args, state, control)
    return saved


def test_saves_every_save_steps_when_saving_is_cheap() -> None:
    clock = Clock()
    saved = run(CheckpointCadence(0.01, clock=clock), clock, 100, 5, step_s=1.0, save_s=0.02)
    assert saved == list(range(5, 101, 5))


def test_skips_periodic_saves_that_would_cost_more_than_the_share() -> None:
    """A save about as long as a step: 1% of the time allows one after 99 times its length."""
    clock = Clock()
    cadence = CheckpointCadence(0.01, clock=clock)
    saved = run(cadence, clock, 250, 1, step_s=0.1, save_s=0.105)
    # The first (no measure yet), then each at least 10.395 s (104 steps) after the previous.
    assert saved == [1, 105, 209, 250]
    assert cadence.skipped == 250 - 4
    measured = 0.105 * 2  # periodic saves after the first, not the last step's
    assert measured / (250 * 0.1 + measured) <= 0.01


def test_the_share_bounds_the_time_spent_saving() -> None:
    for share in (0.01, 0.03, 0.2):
        clock = Clock()
        saved = run(CheckpointCadence(share, clock=clock), clock, 400, 2, step_s=0.07, save_s=0.05)
        periodic = [step for step in saved if step != 400]
        spent = 0.05 * len(periodic)
        # Within the share, up to the first save (made without a measure).
        assert (spent - 0.05) / (400 * 0.07 + spent) <= share
        assert len(periodic) > 1
        assert all(step % 2 == 0 for step in saved) and saved[-1] == 400


def test_logging_and_evaluation_before_a_save_are_not_its_cost() -> None:
    clock = Clock()
    cadence = CheckpointCadence(0.5, clock=clock)
    args = SimpleNamespace(device="cpu")
    state = SimpleNamespace(global_step=1, max_steps=10)
    control = TrainerControl(should_save=True)
    cadence.on_step_end(args, state, control)
    clock.now += 3.0  # logging
    cadence.on_log(args, state, control)
    clock.now += 5.0  # evaluation
    cadence.on_evaluate(args, state, control)
    clock.now += 0.5  # the save itself
    cadence.on_save(args, state, control)
    assert cadence.earliest_next_save() == pytest.approx(clock.now + 0.5)


def test_a_resumed_run_starts_without_a_measure() -> None:
    """A new process (a retry, a readmitted job) writes its first periodic checkpoint."""
    clock = Clock()
    saved = run(CheckpointCadence(0.01, clock=clock), clock, 20, 4, step_s=0.1, save_s=1.0)
    assert saved == [4, 20]


def test_the_share_must_be_a_fraction() -> None:
    for share in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="share must be between 0 and 1"):
            CheckpointCadence(share)


def test_sigterm_in_data_parallel_training_saves_and_stops_after_the_step() -> None:
    """Without a process group the agreement is this process's own note of the signal; the
    checkpoint it asks for is never skipped, however recent the last one."""
    before = signal.getsignal(signal.SIGTERM)
    clock = Clock()
    cadence = CheckpointCadence(0.01, distributed=True, clock=clock)
    args: Any = SimpleNamespace(device="cpu")
    state: Any = SimpleNamespace(global_step=3, max_steps=10)
    control = TrainerControl(should_save=True)
    cadence.on_train_begin(args, state, control)
    try:
        cadence.on_step_end(args, state, control)
        clock.now += 0.5
        cadence.on_save(args, state, control)
        clock.now += 0.1
        control = TrainerControl()
        state.global_step = 4
        cadence.on_step_end(args, state, control)
        assert not (control.should_save or control.should_training_stop)
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised
        assert cadence.signalled
        assert cadence.too_soon()
        cadence.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop
        final = TrainerControl(should_save=True)
        cadence.on_step_end(args, SimpleNamespace(global_step=10, max_steps=10), final)
        assert final.should_save  # the last step is saved
        assert not final.should_training_stop  # and ends the run anyway
    finally:
        cadence.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_single_process_leaves_sigterm_to_transformers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cadence = CheckpointCadence(0.01)
    cadence.on_train_begin(SimpleNamespace(device="cpu"), None, TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == before
