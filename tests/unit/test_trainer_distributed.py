"""The launcher's decisions (how many workers, when not to launch), where each process's outcome
goes, and how the workers' outcomes become the run's one outcome. The real launch is exercised by
tests/training/test_train_distributed.py."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune_api import ComputeCapability
from finetune_api.trainer_config import TrainerOutcome
from finetune_trainer import distributed
from finetune_trainer.distributed import LaunchResult, Worker, WorkerOutcome, conclude
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.hardware import Device, Gpu, check_workers


def gpus(count: int) -> Callable[[], int]:
    return lambda: count


def no_gpu_query() -> int:
    raise AssertionError("the GPUs need not be counted")


@pytest.mark.parametrize(
    ("env", "visible", "expected"),
    [
        ({}, 0, 1),  # CPU: train in this process
        ({}, 1, 1),  # one GPU: train in this process, as ever
        ({}, 4, 4),  # resources.gpus 4: one worker per GPU
        ({"FINETUNE_NPROC": "2"}, 0, 2),  # CPU workers (gloo)
        ({"FINETUNE_NPROC": "1"}, 8, 1),  # the escape hatch: one process on a multi-GPU pod
        ({"FINETUNE_NPROC": "3"}, 8, 3),  # fewer workers than GPUs
        ({"FINETUNE_NPROC": " "}, 2, 2),  # blank: unset
    ],
)
def test_how_many_workers(env: dict[str, str], visible: int, expected: int) -> None:
    assert distributed.processes_to_launch(env, gpus(visible)) == expected


def test_the_override_is_used_without_counting_gpus() -> None:
    assert distributed.processes_to_launch({"FINETUNE_NPROC": "2"}, no_gpu_query) == 2


@pytest.mark.parametrize(
    "env",
    [
        {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "FINETUNE_NPROC": "2"},
        {"WORLD_SIZE": "4"},  # started by another launcher
        {"LOCAL_RANK": "0"},
    ],
)
def test_a_worker_never_launches_workers(env: dict[str, str]) -> None:
    assert distributed.processes_to_launch(env, no_gpu_query) == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_override_is_invalid_input(value: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        distributed.processes_to_launch({"FINETUNE_NPROC": value}, no_gpu_query)
    assert error.value.message == (f"FINETUNE_NPROC={value!r}: must be an integer >= 1 (processes)")


def test_this_process_in_the_run() -> None:
    assert distributed.current({}) == Worker(rank=0, local_rank=0, world_size=1)
    worker = distributed.current({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert worker == Worker(rank=3, local_rank=1, world_size=4, local_world_size=4)
    # One of two pods of 2 workers each: the GPUs it needs are its own pod's.
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.current(env).local_world_size == 2
    assert worker.distributed and not worker.is_main
    assert Worker().is_main and not Worker().distributed


def test_threads_are_shared_among_the_workers() -> None:
    assert distributed.default_threads(2, available=16) == 8
    assert distributed.default_threads(4, available=2) == 1
    assert distributed.default_threads(3) >= 1


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000", 1)],
)
def test_the_container_cpu_limit_caps_the_cpus(
    cpu_max: str, limit: int | None, tmp_path: Path
) -> None:
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    expected = affinity if limit is None else min(affinity, limit)
    assert distributed.available_cpus(path) == expected
    assert distributed.available_cpus(tmp_path / "none") == affinity  # cgroup v1 or no limit


A100 = Gpu(0, "NVIDIA A100", ComputeCapability(8, 0))


def test_each_worker_needs_its_own_gpu() -> None:
    two = Device(gpus=(A100, Gpu(1, "NVIDIA A100", ComputeCapability(8, 0))), bf16=True)
    check_workers(two, 2)
    check_workers(Device(gpus=(), bf16=False), 8)  # CPU workers share the CPU
    with pytest.raises(InvalidInputError, match=r"^4 data-parallel workers need a GPU each; 2 are"):
        check_workers(two, 4)
    with pytest.raises(InvalidInputError, match="2 data-parallel workers need a GPU each; 1 is"):
        Device(gpus=(A100,), bf16=True).for_worker(local_rank=1, world_size=2)


def test_a_single_process_or_a_cpu_worker_keeps_the_device() -> None:
    device = Device(gpus=(A100,), bf16=True)
    assert device.for_worker(local_rank=0, world_size=1) is device
    cpu = Device(gpus=(), bf16=False)
    assert cpu.for_worker(local_rank=1, world_size=2) is cpu


# --- Where the outcome goes -----------------------------------------------------------------

SUCCEEDED = TrainerOutcome(outcome="Succeeded", reason="Completed", message="trained 5 steps")


def failed(message: str, reason: str = "TrainingError") -> TrainerOutcome:
    return TrainerOutcome(outcome="Failed", reason=reason, message=message)


@pytest.fixture
def termination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(path))
    return path


def test_a_single_process_writes_the_termination_message(termination: Path) -> None:
    assert distributed.deliver(SUCCEEDED, 0, env={}) == ""
    assert json.loads(termination.read_text())["outcome"] == "Succeeded"


def test_a_launched_worker_reports_to_its_launcher_only(termination: Path, tmp_path: Path) -> None:
    outcomes = tmp_path / "outcomes"
    outcomes.mkdir()
    env = {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "FINETUNE_WORKER_OUTCOMES": str(outcomes),
    }
    assert distributed.deliver(failed("boom"), 1, env=env) == "rank 1: "
    assert not termination.exists()
    assert [path.name for path in outcomes.iterdir()] == ["rank-1.json"]
    (report,) = distributed.read_outcomes(outcomes).values()
    assert (report.rank, report.exit_code, report.outcome) == (1, 1, failed("boom"))


def test_under_another_launcher_rank_0_alone_writes_the_termination_message(
    termination: Path,
) -> None:
    assert distributed.deliver(failed("x"), 1, env={"RANK": "1", "WORLD_SIZE": "2"}) == "rank 1: "
    assert not termination.exists()
    assert distributed.deliver(failed("x"), 1, env={"RANK": "0", "WORLD_SIZE": "2"}) == ""
    assert json.loads(termination.read_text())["message"] == "x"


def test_worker_outcomes_survive_the_round_trip() -> None:
    report = WorkerOutcome(2, failed("bad", "InvalidInput"), 2, 1234.5)
    assert WorkerOutcome.from_json(report.to_json()) == report


def test_an_unreadable_outcome_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "rank-0.json").write_text("{not json")
    (tmp_path / "rank-1.json").write_text(WorkerOutcome(1, SUCCEEDED, 0, 1.0).to_json())
    assert list(distributed.read_outcomes(tmp_path)) == [1]


# --- The run's one outcome --------------------------------------------------------------------


def test_all_succeeded_is_rank_0s_outcome() -> None:
    with_result = SUCCEEDED.model_copy(update={"message": "rank 0"})
    outcomes = {
        0: WorkerOutcome(0, with_result, 0, 2.0),
        1: WorkerOutcome(1, SUCCEEDED, 0, 1.0),
    }
    assert conclude(outcomes, LaunchResult(), 2) == (with_result, 0)


def test_the_first_failure_is_the_cause() -> None:
    """Rank 1 failed first; the launcher then stopped rank 0, which failed later."""
    cause = failed("spec.training.attn_implementation: not installed", "InvalidInput")
    outcomes = {
        0: WorkerOutcome(0, failed("interrupted by SIGTERM", "Interrupted"), 1, 20.0),
        1: WorkerOutcome(1, cause, 2, 10.0),
    }
    assert conclude(outcomes, LaunchResult(exit_codes={0: 1, 1: 2}), 2) == (cause, 2)


def test_one_failed_worker_fails_the_run_even_if_the_others_succeeded() -> None:
    cause = failed("FileExistsError: [Errno 17] File exists: 'out'")
    outcomes = {0: WorkerOutcome(0, cause, 1, 5.0), 1: WorkerOutcome(1, SUCCEEDED, 0, 4.0)}
    assert conclude(outcomes, LaunchResult(exit_codes={0: 1}), 2) == (cause, 1)


def test_a_worker_that_died_without_a_word() -> None:
    outcomes = {0: WorkerOutcome(0, SUCCEEDED, 0, 1.0)}
    killed = LaunchResult(exit_codes={1: -signal.SIGKILL})
    assert conclude(outcomes, killed, 4) == (
        failed(
            "worker rank 1 of 4 was killed by SIGKILL (out of memory?) without reporting an outcome"
        ),
        1,
    )
    crashed = LaunchResult(exit_codes={3: 139})
    outcome, code = conclude({}, crashed, 4)
    assert (outcome.message, code) == (
        "worker rank 3 of 4 exited with code 139 without reporting an outcome",
        1,
    )


def test_a_signalled_launcher_without_worker_outcomes_is_an_interruption() -> None:
    outcome, code = conclude({}, LaunchResult(signal="SIGTERM"), 2)
    assert (outcome.outcome, outcome.reason, code) == ("Failed", "Interrupted", 3)
    assert outcome.message.startswith("interrupted by SIGTERM before the workers reported")
    # When they did report (they checkpointed and stopped), theirs is the outcome.
    stopped = failed("training stopped at step 7 of 10; a retry resumes from checkpoint-7")
    stopped = stopped.model_copy(update={"reason": "Interrupted"})
    outcomes = {r: WorkerOutcome(r, stopped, 3, 1.0 + r) for r in (0, 1)}
    assert conclude(outcomes, LaunchResult(signal="SIGTERM"), 2) == (stopped, 3)


def test_a_pod_without_rank_0_reports_its_lowest_ranks_outcome() -> None:
    """Pod 1 of a multi-node run holds ranks 2 and 3: their success is its outcome."""
    third = SUCCEEDED.model_copy(update={"message": "rank 2"})
    outcomes = {3: WorkerOutcome(3, SUCCEEDED, 0, 1.0), 2: WorkerOutcome(2, third, 0, 2.0)}
    assert conclude(outcomes, LaunchResult(), 4) == (third, 0)


def test_no_outcome_at_all_is_a_failure() -> None:
    outcome, code = conclude({}, LaunchResult(), 2)
    assert (outcome.outcome, code) == ("Failed", 1)
    assert outcome.message == "the 2 workers ended but none reported an outcome"


def test_only_the_last_restarts_outcomes_count(tmp_path: Path) -> None:
    """A peer pod died: this pod's agent restarted its workers, whose first attempt failed."""
    lost = failed("RuntimeError: Connection closed by peer")
    (tmp_path / "rank-0.json").write_text(WorkerOutcome(0, SUCCEEDED, 0, 9.0, 1).to_json())
    (tmp_path / "rank-1.json").write_text(WorkerOutcome(1, lost, 1, 2.0, 0).to_json())
    outcomes = distributed.read_outcomes(tmp_path)
    assert list(outcomes) == [0]
    assert conclude(outcomes, LaunchResult(), 2) == (SUCCEEDED, 0)


# --- Several pods -----------------------------------------------------------------------------

POD_1 = {
    "FINETUNE_NNODES": "3",
    "FINETUNE_RDZV_ENDPOINT": "tiny-train-0.tiny-workers:29400",
    "FINETUNE_RDZV_ID": "uid-1",
    "FINETUNE_SUBDOMAIN": "tiny-workers",
    "JOB_COMPLETION_INDEX": "1",
}


def test_the_rendezvous_comes_from_the_operators_env() -> None:
    import socket

    assert distributed.rendezvous({}) is None
    assert distributed.rendezvous({**POD_1, "FINETUNE_NNODES": "1"}) is None
    assert distributed.rendezvous({**POD_1, "LOCAL_RANK": "0"}) is None  # a worker: no launcher
    meet = distributed.rendezvous(POD_1)
    assert meet == distributed.Rendezvous(
        nodes=3,
        index=1,
        endpoint="tiny-train-0.tiny-workers:29400",
        run_id="uid-1",
        local_addr=f"{socket.gethostname()}.tiny-workers",
    )
    assert not meet.is_host
    assert distributed.rendezvous({**POD_1, "JOB_COMPLETION_INDEX": "0"}).is_host  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "change",
    [{"FINETUNE_RDZV_ENDPOINT": ""}, {"JOB_COMPLETION_INDEX": "3"}, {"JOB_COMPLETION_INDEX": "x"}],
)
def test_a_rendezvous_without_endpoint_or_index_is_invalid_input(change: dict[str, str]) -> None:
    with pytest.raises(InvalidInputError) as error:
        distributed.rendezvous({**POD_1, **change})
    assert error.value.message.startswith(
        "FINETUNE_NNODES=3 needs FINETUNE_RDZV_ENDPOINT (HOST:PORT) and JOB_COMPLETION_INDEX (0 to 2)"
    )


def test_launch_config_alone_and_together(tmp_path: Path) -> None:
    alone = distributed.launch_config(2, str(tmp_path))
    assert (alone.min_nodes, alone.max_nodes, alone.nproc_per_node) == (1, 1, 2)
    assert (alone.rdzv_endpoint, alone.max_restarts) == ("localhost:0", 0)
    meet = distributed.rendezvous({**POD_1, "JOB_COMPLETION_INDEX": "0"})
    together = distributed.launch_config(1, str(tmp_path), meet, restarts=2)
    assert (together.min_nodes, together.max_nodes, together.nproc_per_node) == (3, 3, 1)
    assert together.rdzv_endpoint == "tiny-train-0.tiny-workers:29400"
    assert together.run_id == "uid-1" and together.max_restarts == 2
    assert together.rdzv_configs["is_host"] is True
    assert together.local_addr.endswith(".tiny-workers")
