"""finetune-trainer: quantized LoRA fine-tuning of one FineTuneJob.

    finetune-trainer --job FILE [--model DIR] [--data FILE] [--output DIR] [--checkpoints DIR]

FILE is a FineTuneJob manifest (then --data and --output are required; without --model the model
is spec.model_name from the Hugging Face Hub) or the operator's TrainerConfig (its paths, each
replaced by the flag given). Exit codes: 0 done, 1 runtime failure (retryable: a retry resumes
from the last checkpoint), 2 invalid input (spec, data, model or hardware; not retryable). The
outcome is also written as a TrainerOutcome JSON termination message; on failure its message is
the last line on stderr.

A pod with several GPUs trains data-parallel: this process checks the inputs, then runs one worker
per GPU (FINETUNE_NPROC overrides the count) and reports their one outcome; several pods (an
Indexed Job) do the same together, meeting in torch's c10d rendezvous; see distributed.py.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from finetune_api.resource import Result
from finetune_api.trainer_config import EXIT_OK, TrainerConfig, TrainerOutcome
from finetune_trainer import distributed
from finetune_trainer.config import PathOverrides, load_trainer_config
from finetune_trainer.errors import TrainerError, TrainingInterruptedError, one_line

log = logging.getLogger("finetune_trainer")

MAX_MESSAGE = 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="finetune-trainer", description="Fine-tune a LoRA adapter for one FineTuneJob."
    )
    parser.add_argument(
        "--job", required=True, help="FineTuneJob manifest or TrainerConfig (YAML or JSON)"
    )
    parser.add_argument("--model", help="local model directory (default: the job's model)")
    parser.add_argument("--data", help="local dataset file (required with a manifest)")
    parser.add_argument("--output", help="output directory (required with a manifest)")
    parser.add_argument("--checkpoints", help="checkpoint directory (default: OUTPUT/checkpoints)")
    return parser.parse_args(argv)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when the record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    """INFO lines of the trainer's own loggers on stderr (the root logger is left alone); only
    warnings and errors from data-parallel workers other than rank 0."""
    log.setLevel(logging.INFO if distributed.current().is_main else logging.WARNING)
    if any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False


class _Sigterm(BaseException):
    """SIGTERM outside the training loop (inside it, the Trainer checkpoints and stops). A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Sigterm


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    overrides = PathOverrides(args.model, args.data, args.output, args.checkpoints)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        config = load_trainer_config(args.job, overrides)
        processes = distributed.processes_to_launch()
        meet = distributed.rendezvous()
        if processes > 1 or meet is not None:
            argv = sys.argv[1:] if argv is None else list(argv)
            return finish(*distributed.launch(config, processes, argv, meet))
        result = train(config)
    except TrainerError as failure:
        return fail(failure)
    except _Sigterm:
        return fail(
            TrainingInterruptedError(
                "interrupted by SIGTERM outside the training loop; a retry resumes from the last "
                "checkpoint, if any"
            )
        )
    except Exception as exc:  # anything unexpected is a runtime failure: retryable
        log.exception("training failed")
        return fail(TrainerError(f"{type(exc).__name__}: {exc}"))
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return finish(
        TrainerOutcome(
            outcome="Succeeded",
            reason="Completed",
            message=success_message(result),
            result=result,
        ),
        EXIT_OK,
    )


def success_message(result: Result) -> str:
    resumed = result.resumed_from_step
    after = f", resumed from step {resumed}" if resumed is not None else ""
    return f"trained {result.steps} steps on {result.records_seen} records{after}"


def train(config: TrainerConfig) -> Result:
    """Run the training (torch and transformers load here) and return its Result."""
    from finetune_trainer.pipeline import run

    outcome = run(config)
    return Result(
        adapter=config.adapter_uri or config.paths.output,
        steps=outcome.steps,
        records_seen=outcome.records_seen,
        final_loss=outcome.final_loss,
        eval_loss=outcome.eval_loss,
        duration_seconds=outcome.duration_seconds,
        resumed_from_step=outcome.resumed_from_step,
    )


def fail(failure: TrainerError) -> int:
    """The Failed outcome of `failure` (see finish)."""
    message = one_line(failure.message)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    outcome = TrainerOutcome(outcome="Failed", reason=failure.reason, message=message)
    return finish(outcome, failure.exit_code)


def finish(outcome: TrainerOutcome, code: int) -> int:
    """Deliver the outcome (the termination message; a launched worker's goes to its launcher),
    print a failure's one-line message last on stderr (a worker's names its rank: the launcher
    prints the run's), and return the exit code."""
    prefix = distributed.deliver(outcome, code)
    if outcome.outcome == "Failed":
        sys.stdout.flush()
        print(prefix + outcome.message, file=sys.stderr, flush=True)
    elif outcome.result is not None and not prefix:  # a worker's launcher says it
        log.info("done: %s", outcome.result.model_dump_json(by_alias=True, exclude_none=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
