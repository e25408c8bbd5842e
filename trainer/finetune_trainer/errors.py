"""The trainer's failures: each carries its exit code and termination reason.

An `InvalidInputError` is a problem with the spec, the data, the model or the hardware: retrying cannot
help, so it exits with EXIT_INVALID_INPUT and the operator does not retry. Everything else is a
runtime failure (EXIT_FAILED) that a retry may fix; a retry resumes from the last checkpoint. A stop
on SIGTERM exits with EXIT_INTERRUPTED: not a failure of the run, so it uses up no retry.
"""

from __future__ import annotations

from finetune_api.trainer_config import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_INPUT


class TrainerError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code: int = EXIT_FAILED
    reason: str = "TrainingError"

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


class InvalidInputError(TrainerError):
    """Bad spec, data, model or hardware: not retryable."""

    exit_code = EXIT_INVALID_INPUT
    reason = "InvalidInput"


class TrainingInterruptedError(TrainerError):
    """Training stopped early (SIGTERM) after saving a checkpoint; the replacement pod resumes from
    it, and the Job's pod failure policy does not count it as a failed attempt."""

    exit_code = EXIT_INTERRUPTED
    reason = "Interrupted"


def one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so a message stays on one line."""
    return " ".join(text.split())
