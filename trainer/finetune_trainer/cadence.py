"""When checkpoints are written, beyond the Trainer's own rule (every plan.save_steps optimizer
steps, and after the last step).

Cost. A periodic checkpoint is skipped until the training since the previous save lasted at
least (1 - share) / share times what that save took, so periodic saving takes at most `share`
(plan.CHECKPOINT_TIME_SHARE, 1%) of the run's time. On a GPU a step takes long against a save
and nothing is skipped; a small model on a CPU saves in about the time of a step, where saving
every 5% of a short run cost 10-14% of its throughput. The first periodic checkpoint of a run
(or of a resumed run) is always written: it gives the first measure. The last step's checkpoint
and a checkpoint on SIGTERM are never skipped.

SIGTERM. A single process leaves it to transformers' JIT checkpoint (it saves by itself, not
through should_save, so nothing here skips it). Data-parallel workers all get SIGTERM (from the
launcher), not at the same moment: each one only notes it, and after every optimizer step the
workers all-reduce (max) their notes and their wish to skip, so all of them save the same
checkpoints and stop after the same step (a worker that saved alone would wait for the others
forever).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class CheckpointCadence(TrainerCallback):  # type: ignore[misc]
    """Skips periodic checkpoints that would cost more than `share` of the time (see the module
    docstring); with `distributed`, also the agreed stop on SIGTERM."""

    def __init__(
        self,
        share: float,
        distributed: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < share < 1:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        self.share = share
        self.distributed = distributed
        self.clock = clock
        self.signalled = False
        self.skipped = 0
        self._save_began: float | None = None
        self._last_cost: float | None = None
        self._last_end: float | None = None
        self._previous: Any = None
        self._installed = False

    def earliest_next_save(self) -> float | None:
        """The clock reading before which a periodic checkpoint is skipped (None: no measure)."""
        if self._last_cost is None or self._last_end is None:
            return None
        return self._last_end + self._last_cost * (1 - self.share) / self.share

    def too_soon(self) -> bool:
        earliest = self.earliest_next_save()
        return earliest is not None and self.clock() < earliest

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        last = state.global_step >= state.max_steps
        skip = bool(control.should_save) and not last and self.too_soon()
        stop = self.signalled
        if self.distributed:
            stop, skip = agree([stop, skip], args.device)
        if stop and not last:
            log.warning("SIGTERM: saving a checkpoint at step %d and stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
        elif skip:
            control.should_save = False
            self._note_skip(state.global_step)
        self._save_began = self.clock() if control.should_save else None

    # Logging and evaluation run between the step's end and the save: not the save's cost.
    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restart_measure()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restart_measure()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._save_began is not None:
            self._last_end = self.clock()
            self._last_cost = self._last_end - self._save_began
            self._save_began = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
        if self.skipped:
            log.info("%d periodic checkpoint(s) skipped to keep saving within %g%% of the time",
                     self.skipped, 100 * self.share)  # fmt: skip

    def _restart_measure(self) -> None:
        if self._save_began is not None:
            self._save_began = self.clock()

    def _note_skip(self, step: int) -> None:
        self.skipped += 1
        level = logging.INFO if self.skipped == 1 else logging.DEBUG
        log.log(
            level,
            "checkpoint at step %d skipped: the last one took %.3f s, and checkpoints take at "
            "most %g%% of the time (the last step and SIGTERM are always saved)",
            step,
            self._last_cost or 0.0,
            100 * self.share,
        )


def agree(flags: list[bool], device: Any) -> list[bool]:
    """Each flag true on any worker (a collective: every worker calls it with as many flags);
    without a process group, the flags as they are."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([int(flag) for flag in flags], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]
