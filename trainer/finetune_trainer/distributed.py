"""Data-parallel training on every GPU of the pod: the launcher, and what each worker is.

How many processes
    FINETUNE_NPROC when set (an integer >= 1: an escape hatch, e.g. 1 to train on one GPU of
    several, or 2 CPU workers with the gloo backend), else the number of visible CUDA devices.
    A process that already is a distributed worker (LOCAL_RANK or WORLD_SIZE in its environment,
    e.g. started by torchrun) never launches more.

Several pods (spec.resources.nodes > 1)
    The operator runs an Indexed Job and sets FINETUNE_NNODES, FINETUNE_RDZV_ENDPOINT (index 0's
    stable name and port), FINETUNE_RDZV_ID (the FineTuneJob's uid) and FINETUNE_SUBDOMAIN (the
    headless Service). Every pod launches its workers (even one) with torch's elastic agent in a
    c10d rendezvous of exactly N nodes: the agent of index 0 hosts its store, each agent names
    itself by its pod's stable name (<hostname>.<subdomain>), so index 0 sorts first and holds
    global rank 0. When a peer dies, the surviving agents stop their workers and, up to
    spec.backoffLimit times, start them again in a new rendezvous round once the Job's replacement
    pod has joined; every worker then resumes from the newest checkpoint in the shared output
    volume. When index 0 dies, the store is gone: the other agents fail too, and the Job's
    replacement pods start the group again from the checkpoint.

The launcher (N > 1)
    First runs the pre-flight checks once (hardware, dataset, model config and tokenizer, plan,
    LoRA target modules on the weightless model), so that an invalid input fails fast with one
    line and no worker starts. Then starts N workers with torch's elastic launcher (standalone
    rendezvous on localhost, no restarts; across pods, as above), each running the same command
    line, and waits for them. OMP_NUM_THREADS, when unset, becomes the available CPUs (affinity,
    capped by the container's CPU limit) divided among the workers.

The workers
    One DDP rank each (the transformers Trainer; NCCL on GPUs, gloo on CPU), on the GPU at its
    local rank. Only rank 0 reports status.progress, prepares the checkpoint directory (the other
    ranks wait for it) and saves the adapter, the tokenizer and training_summary.json; the Trainer
    writes checkpoints from rank 0. Ranks other than 0 log warnings and errors only.

The outcome
    Launched workers never write the termination message: each writes its TrainerOutcome and exit
    code into a directory the launcher made (FINETUNE_WORKER_OUTCOMES; only the last restart's
    count), and the launcher writes the one termination message and exits with the matching code:
    its lowest rank's outcome (rank 0's on the first pod) when all succeeded; else the first
    failure written (when a worker fails, the launcher stops the others, whose failures come
    later); else, when a worker died without a word (killed, out of memory),
    a runtime failure naming it. Its message is the launcher's last line on stderr.

SIGTERM (preemption)
    The launcher passes it on to the workers and waits SHUTDOWN_SECONDS for them (then kills
    them). The workers agree after every optimizer step whether any of them was signalled, so all
    save the same checkpoint and stop at the same step (see cadence.CheckpointCadence); a retry
    resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.trainer_config import (
    ENV_NNODES,
    ENV_NODE_INDEX,
    ENV_RDZV_ENDPOINT,
    ENV_RDZV_ID,
    ENV_SUBDOMAIN,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    TrainerOutcome,
)
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.report import write_outcome

if TYPE_CHECKING:  # pragma: no cover - typing only
    from finetune_api.trainer_config import TrainerConfig

log = logging.getLogger(__name__)

ENV_NPROC = "FINETUNE_NPROC"
ENV_OUTCOMES = "FINETUNE_WORKER_OUTCOMES"
WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
# Seconds the workers get to checkpoint after a SIGTERM, within the pod's 300 s grace period.
SHUTDOWN_SECONDS = 240
ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by the elastic agent for its workers
JOIN_TIMEOUT = 900  # seconds the agents wait for all nodes (a replacement pod, a slow pull)
# Several pods: rank 0's agent publishes the workers' store address in every rendezvous round.
# With the store shared with the agents (torch's default) an agent that was rank 0 before
# publishes it only in its first round, so a replacement pod joining a later round waits for it
# until it times out.
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclass(frozen=True)
class Worker:
    """This process's place in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # the workers in this pod

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        return default


def is_worker(env: Mapping[str, str] | None = None) -> bool:
    """True in a process started by a distributed launcher (this one or torchrun)."""
    env = os.environ if env is None else env
    return any(name in env for name in WORKER_ENV)


def current(env: Mapping[str, str] | None = None) -> Worker:
    """This process's rank, local rank and world size, from the launcher's environment."""
    env = os.environ if env is None else env
    if not is_worker(env):
        return Worker()
    world_size = max(1, _int(env, "WORLD_SIZE", 1))
    return Worker(
        rank=_int(env, "RANK", 0),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=world_size,
        local_world_size=max(1, _int(env, "LOCAL_WORLD_SIZE", world_size)),
    )


@dataclass(frozen=True)
class Rendezvous:
    """Where the pods of a multi-node run meet (see the module docstring)."""

    nodes: int
    index: int  # this pod's completion index
    endpoint: str  # HOST:PORT of index 0
    run_id: str
    local_addr: str | None  # this pod's stable name, <hostname>.<subdomain>

    @property
    def is_host(self) -> bool:
        return self.index == 0


def rendezvous(env: Mapping[str, str] | None = None) -> Rendezvous | None:
    """The multi-node rendezvous the operator configured; None for a single pod (and in a
    worker: only launchers meet)."""
    env = os.environ if env is None else env
    nodes = _int(env, ENV_NNODES, 1)
    if nodes <= 1 or is_worker(env):
        return None
    endpoint = env.get(ENV_RDZV_ENDPOINT, "").strip()
    index = _int(env, ENV_NODE_INDEX, -1)
    if not endpoint or not 0 <= index < nodes:
        raise InvalidInputError(
            f"{ENV_NNODES}={nodes} needs {ENV_RDZV_ENDPOINT} (HOST:PORT) and {ENV_NODE_INDEX} "
            f"(0 to {nodes - 1}), as an Indexed Job sets them; got {endpoint!r} and "
            f"{env.get(ENV_NODE_INDEX)!r}"
        )
    subdomain = env.get(ENV_SUBDOMAIN, "").strip()
    return Rendezvous(
        nodes=nodes,
        index=index,
        endpoint=endpoint,
        run_id=env.get(ENV_RDZV_ID, "").strip() or "finetune",
        local_addr=f"{socket.gethostname()}.{subdomain}" if subdomain else None,
    )


def requested_processes(env: Mapping[str, str]) -> int | None:
    """FINETUNE_NPROC as an integer >= 1, None when unset or empty."""
    raw = env.get(ENV_NPROC, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidInputError(f"{ENV_NPROC}={raw!r}: must be an integer >= 1 (processes)")
    return value


def visible_gpus() -> int:
    """The number of CUDA devices this process sees (0 without CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def processes_to_launch(
    env: Mapping[str, str] | None = None, gpus: Callable[[], int] = visible_gpus
) -> int:
    """How many workers this process should launch; 1: train here, in this process."""
    env = os.environ if env is None else env
    if is_worker(env):
        return 1
    requested = requested_processes(env)
    if requested is not None:
        return requested
    return max(1, gpus())


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its CPU affinity, capped by the container's CPU limit (the
    cgroup v2 quota, when there is one)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = cpu_max.read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def default_threads(processes: int, available: int | None = None) -> int:
    """OpenMP threads per worker: the CPUs this process may use, shared among the workers."""
    if available is None:
        available = available_cpus()
    return max(1, available // processes)


# --- The worker side: where the outcome goes ------------------------------------------------


@dataclass(frozen=True)
class WorkerOutcome:
    """What one worker reports to the launcher."""

    rank: int
    outcome: TrainerOutcome
    exit_code: int
    written: float  # time.time() when written: the first failure is the root cause
    attempt: int = 0  # the elastic agent's restart count when written

    def to_json(self) -> str:
        return json.dumps(
            {
                "rank": self.rank,
                "exitCode": self.exit_code,
                "written": self.written,
                "attempt": self.attempt,
                "outcome": self.outcome.model_dump(mode="json", by_alias=True, exclude_none=True),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerOutcome:
        data = json.loads(text)
        return cls(
            rank=int(data["rank"]),
            outcome=TrainerOutcome.model_validate(data["outcome"]),
            exit_code=int(data["exitCode"]),
            written=float(data["written"]),
            attempt=int(data.get("attempt", 0)),
        )


def outcome_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank-{rank}.json"


def deliver(outcome: TrainerOutcome, exit_code: int, env: Mapping[str, str] | None = None) -> str:
    """Hand this process's outcome on: to the launcher when it is a launched worker, else as the
    termination message (by rank 0 only: the other ranks of a foreign launcher say nothing).
    Returns "" when this process has the last word, else "rank R: " (for its own stderr line)."""
    env = os.environ if env is None else env
    worker = current(env)
    directory = env.get(ENV_OUTCOMES)
    if directory and is_worker(env):
        attempt = _int(env, RESTART_COUNT, 0)
        report = WorkerOutcome(worker.rank, outcome, exit_code, time.time(), attempt)
        target = outcome_file(directory, worker.rank)
        partial = target.with_suffix(".partial")
        partial.write_text(report.to_json(), encoding="utf-8")
        partial.replace(target)  # atomic: the launcher never reads half a file
        return f"rank {worker.rank}: "
    if worker.is_main:
        write_outcome(outcome)
        return ""
    return f"rank {worker.rank}: "


# --- The launcher side ---------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchResult:
    """How the workers ended, as the elastic launcher saw them."""

    exit_codes: dict[int, int] = field(default_factory=dict)  # rank -> code, failed ranks only
    signal: str | None = None  # the signal that stopped the launcher, if any


def read_outcomes(directory: str | Path) -> dict[int, WorkerOutcome]:
    """The outcomes the workers of the last restart wrote, by rank (a missing or unreadable one
    is left out)."""
    outcomes: dict[int, WorkerOutcome] = {}
    for path in sorted(Path(directory).glob("rank-*.json")):
        try:
            report = WorkerOutcome.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("unreadable worker outcome %s: %s", path.name, exc)
            continue
        outcomes[report.rank] = report
    last = max((report.attempt for report in outcomes.values()), default=0)
    return {rank: report for rank, report in outcomes.items() if report.attempt == last}


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def conclude(
    outcomes: Mapping[int, WorkerOutcome], launch: LaunchResult, world_size: int
) -> tuple[TrainerOutcome, int]:
    """The run's one outcome and exit code, from what the workers reported (see the module
    docstring)."""
    failed = [report for report in outcomes.values() if report.outcome.outcome == "Failed"]
    if failed:
        first = min(failed, key=lambda report: (report.written, report.rank))
        return first.outcome, first.exit_code
    if launch.signal is not None:
        message = (
            f"interrupted by {launch.signal} before the workers reported; a retry resumes from "
            "the last checkpoint, if any"
        )
        outcome = TrainerOutcome(outcome="Failed", reason="Interrupted", message=message)
        return outcome, EXIT_INTERRUPTED
    if launch.exit_codes:
        rank = min(launch.exit_codes)
        message = (
            f"worker rank {rank} of {world_size} {describe_exit(launch.exit_codes[rank])} "
            "without reporting an outcome"
        )
        return TrainerOutcome(
            outcome="Failed", reason="TrainingError", message=message
        ), EXIT_FAILED
    main = outcomes[min(outcomes)] if outcomes else None
    if main is None:
        message = f"the {world_size} workers ended but none reported an outcome"
        return TrainerOutcome(
            outcome="Failed", reason="TrainingError", message=message
        ), EXIT_FAILED
    return main.outcome, EXIT_OK


@contextlib.contextmanager
def _environment(updates: Mapping[str, str], restore: Sequence[str] = ()) -> Iterator[None]:
    """Set `updates` (the workers inherit the environment); put them and `restore` back after."""
    names = [*updates, *restore]
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _signal_handlers() -> Iterator[None]:
    """The elastic launcher installs its own signal handlers and leaves them: put ours back."""
    if sys.platform == "win32":  # pragma: no cover - the trainer runs on Linux
        yield
        return
    names = [name.strip() for name in ELASTIC_SIGNALS.split(",")]
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        yield
    finally:
        for name, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)


def launch_config(
    processes: int, log_dir: str, meet: Rendezvous | None = None, restarts: int = 0
) -> Any:
    """torch's LaunchConfig: one pod alone (a standalone store on a free local port, no restarts:
    a failed run is the operator's to retry), or one of `meet.nodes` pods in the c10d
    rendezvous at index 0, whose agents restart their workers up to `restarts` times."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    common: dict[str, Any] = {
        "nproc_per_node": processes,
        "rdzv_backend": "c10d",
        "logs_specs": DefaultLogsSpecs(log_dir=log_dir),
        "signals_to_handle": ELASTIC_SIGNALS,
        "shutdown_timeout": SHUTDOWN_SECONDS,
    }
    if meet is None:
        return LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            run_id=uuid.uuid4().hex,
            rdzv_endpoint="localhost:0",
            local_addr="localhost",
            max_restarts=0,
            **common,
        )
    return LaunchConfig(
        min_nodes=meet.nodes,
        max_nodes=meet.nodes,
        run_id=meet.run_id,
        rdzv_endpoint=meet.endpoint,
        rdzv_configs={"join_timeout": JOIN_TIMEOUT, "is_host": meet.is_host},
        local_addr=meet.local_addr,
        max_restarts=restarts,
        **common,
    )


def run_workers(config: Any, argv: Sequence[str]) -> LaunchResult:
    """Start the workers `config` (a LaunchConfig) describes, each running
    `python -m finetune_trainer ARGV`, and wait for them."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, sys.executable)("-m", "finetune_trainer", *argv)
    except ChildFailedError as exc:
        return LaunchResult(exit_codes={rank: f.exitcode for rank, f in exc.failures.items()})
    except SignalException as exc:
        log.warning("%s: the workers were stopped", exc.sigval.name)
        return LaunchResult(signal=exc.sigval.name)
    return LaunchResult()


def launch(
    config: TrainerConfig, processes: int, argv: Sequence[str], meet: Rendezvous | None = None
) -> tuple[TrainerOutcome, int]:
    """Check the inputs once, run `processes` data-parallel workers (in this pod; `meet`: with
    the other pods'), and return this pod's one outcome and exit code (an invalid input raises
    InvalidInputError before any worker starts)."""
    from finetune_trainer.pipeline import preflight

    world_size = processes * (meet.nodes if meet else 1)
    preflight(config, processes, world_size)
    if meet is None:
        log.info("starting %d data-parallel workers", processes)
    else:
        log.info(
            "starting %d of %d data-parallel workers: pod %d of %d, rendezvous at %s",
            processes, world_size, meet.index, meet.nodes, meet.endpoint,
        )  # fmt: skip
    restarts = config.spec.backoff_limit
    with tempfile.TemporaryDirectory(prefix="finetune-workers-") as directory:
        updates = {ENV_OUTCOMES: directory, **(NO_SHARED_STORE if meet else {})}
        if not os.environ.get("OMP_NUM_THREADS"):
            updates["OMP_NUM_THREADS"] = str(default_threads(processes))
        with (
            _environment(updates, restore=["TORCHELASTIC_SIGNALS_TO_HANDLE"]),
            _signal_handlers(),
        ):
            logs = str(Path(directory) / "logs")
            result = run_workers(launch_config(processes, logs, meet, restarts), argv)
        return conclude(read_outcomes(directory), result, world_size)
