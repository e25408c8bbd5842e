"""Data-parallel training through the real CLI entry point: FINETUNE_NPROC=2 makes finetune-trainer
launch 2 worker processes (torch's elastic launcher, gloo on CPU) that train one model with DDP.

What a pod with several GPUs gets: the plan counts both workers (a step consumes batch x
accumulation x 2 records), the first optimizer step's loss is the loss of the first global batch
(both workers' records), only rank 0 reports progress and writes the outputs, and exactly one
termination message is written, also when a worker fails. Files that must be written once are
named pipes here, so that every write of them is seen (see helpers.WriteLog).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import plan
from training.fake_apiserver import fake_apiserver
from training.helpers import (
    TinyModel,
    WriteLog,
    captured_stderr,
    manifest,
    text_rows,
    write_jsonl,
)

pytestmark = pytest.mark.training

WORKERS = 2
TRAINING = {
    "num_input_records_to_sample": 76,
    "batch_size": 2,
    "gradient_accumulation_steps": 2,  # 4 records per worker and step, 8 in all
    "learning_rate": 0.02,
    "lr_scheduler": "constant",
    "lora_r": 4,
    "lora_target_modules": ["all-linear"],
    "peft_implementation": "lora",
}
STEPS = math.ceil(76 / (2 * 2 * WORKERS))  # 10 (19 in one process); the last step is partial
DATASET_RECORDS = 16


@dataclass(frozen=True)
class Run:
    code: int
    stderr: str
    outcomes: list[dict[str, Any]]  # every termination message written
    summaries: list[dict[str, Any]]  # every training_summary.json written
    output: Path
    checkpoints: Path

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def state(self, step: int) -> dict[str, Any]:
        path = self.checkpoints / f"checkpoint-{step}" / "trainer_state.json"
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def losses(self, step: int) -> list[tuple[int, float]]:
        history = self.state(step)["log_history"]
        return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def train(
    tmp: Path,
    job: Path,
    model: Path,
    data: Path,
    *,
    output: Path,
    checkpoints: Path | None = None,
    workers: int = WORKERS,
    env: dict[str, str] | None = None,
) -> Run:
    """Run `finetune_trainer.main.main` in-process (the workers are real processes) with
    FINETUNE_NPROC=workers; the termination message and (when the output directory is new) the
    summary are named pipes."""
    from finetune_trainer.main import main

    tmp.mkdir(parents=True, exist_ok=True)
    termination = WriteLog(tmp / "termination-log")
    summary = None
    if not output.exists():
        output.mkdir(parents=True)
        summary = WriteLog(output / "training_summary.json")
    checkpoints = checkpoints or output / "checkpoints"
    argv = ["--job", str(job), "--model", str(model), "--data", str(data)]
    argv += ["--output", str(output), "--checkpoints", str(checkpoints)]
    log = tmp / "stderr.log"
    try:
        with pytest.MonkeyPatch.context() as patch, captured_stderr(log):
            patch.setenv("FINETUNE_NPROC", str(workers))
            patch.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(termination.path))
            patch.delenv("FINETUNE_REPORT_STATUS", raising=False)
            patch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            code = main(argv)
    finally:
        outcomes = [json.loads(text) for text in termination.close()]
        summaries = [json.loads(text) for text in summary.close()] if summary else []
    return Run(code, log.read_text(), outcomes, summaries, output, checkpoints)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", text_rows(DATASET_RECORDS))


@pytest.fixture(scope="module")
def lora_run(
    tiny_model: TinyModel, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Run, list[dict[str, Any]]]:
    """Two workers train LoRA, reporting status.progress to a fake API server at most once an
    hour, plus the final report (so a reporter sends exactly two): the run several tests read."""
    tmp = tmp_path_factory.mktemp("lora")
    job = manifest(tmp / "job.yaml", training=TRAINING)
    with fake_apiserver(tmp) as (api, kubeconfig):
        env = {
            "FINETUNE_REPORT_STATUS": "true",
            "FINETUNE_JOB_NAME": "tiny",
            "FINETUNE_JOB_NAMESPACE": "default",
            "FINETUNE_REPORT_INTERVAL": "3600",
            "KUBECONFIG": str(kubeconfig),
        }
        run = train(tmp / "run", job, tiny_model.path, data, output=tmp / "out", env=env)
        bodies = api.bodies
    return run, bodies


def test_two_workers_share_each_optimizer_step(lora_run: tuple[Run, Any]) -> None:
    run, _ = lora_run
    assert run.code == 0, run.stderr[-3000:]
    assert (
        f"plan: 76 records ({DATASET_RECORDS} train, 0 validation) -> {STEPS} steps of 8 "
        "(4 per device x 2 workers)"
    ) in run.stderr
    assert "starting 2 data-parallel workers" in run.stderr
    # The Trainer's own record: 10 optimizer steps, and one RNG state per process of the group.
    assert run.state(STEPS)["global_step"] == STEPS == plan.optimizer_steps(76, 8)
    files = {path.name for path in (run.checkpoints / f"checkpoint-{STEPS}").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= files
    assert "rng_state.pth" not in files  # what a single process saves
    args = training_args(run)
    assert (args.max_steps, args.per_device_train_batch_size) == (STEPS, 2)
    assert args.gradient_accumulation_steps == 2
    assert args.ddp_find_unused_parameters is False


def test_one_termination_message_and_one_set_of_outputs(lora_run: tuple[Run, Any]) -> None:
    run, _ = lora_run
    assert len(run.outcomes) == 1, run.outcomes  # the launcher's; the workers write none
    outcome = run.outcomes[0]
    assert (outcome["outcome"], outcome["reason"]) == ("Succeeded", "Completed")
    assert (outcome["result"]["steps"], outcome["result"]["recordsSeen"]) == (STEPS, 76)
    assert len(run.summaries) == 1, "training_summary.json must be written by rank 0 only"
    summary = run.summaries[0]
    assert (summary["world_size"], summary["global_batch_size"]) == (2, 8)
    assert (summary["steps"], summary["records_seen"]) == (STEPS, 76)
    assert summary["epochs"] == round(76 / DATASET_RECORDS, 4)
    assert summary["resolved"]["world_size"] == 2
    assert summary["resolved"]["effective_batch_size"] == 4  # per device, as in the spec
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (run.output / name).is_file(), name


def test_the_first_step_learns_from_both_workers_records(
    lora_run: tuple[Run, Any], tiny_model: TinyModel, data: Path
) -> None:
    """LoRA's B starts at zero, so the first step's loss is the base model's mean token loss over
    the first global batch: the first 8 planned records, 4 of them on each worker. And the
    adapter they trained together lowers the loss on the training records."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = lora_run
    logged = run.losses(STEPS)
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert run.outcomes[0]["result"]["finalLoss"] == pytest.approx(logged[-1][1])
    examples = planned_examples(tiny_model.path, data)
    base = AutoModelForCausalLM.from_pretrained(tiny_model.path).eval()
    first_global = mean_token_loss(base, examples, records=8)
    one_worker = mean_token_loss(base, examples, records=4)
    assert logged[0][1] == pytest.approx(first_global, rel=1e-4)
    assert abs(first_global - one_worker) > 1e-3  # the check can tell the two apart

    before = mean_token_loss(base, examples, records=DATASET_RECORDS)  # one pass over all
    tuned = PeftModel.from_pretrained(base, run.output).eval()
    after = mean_token_loss(tuned, examples, records=DATASET_RECORDS)
    assert after < before - 0.2, (before, after)


def test_only_rank_0_reports_progress(lora_run: tuple[Run, Any]) -> None:
    """One reporter sends its first report (step 1) and the forced final one; a reporter on each
    worker would send both twice."""
    run, bodies = lora_run
    progress = [body["status"]["progress"] for body in bodies]
    assert [report["step"] for report in progress] == [1, STEPS], progress
    final = progress[-1]
    assert (final["totalSteps"], final["percent"]) == (STEPS, 100)
    assert final["loss"] == round(run.outcomes[0]["result"]["finalLoss"], 4)
    assert final["epoch"] == pytest.approx(76 / DATASET_RECORDS)


def test_qlora_bnb_4bit_trains_data_parallel(
    tiny_model: TinyModel, data: Path, tmp_path: Path
) -> None:
    training = {**TRAINING, "quantize_model": True, "quantization_scheme": "bnb-4bit"}
    training["peft_implementation"] = "qlora"  # gradient checkpointing (non-reentrant) under DDP
    job = manifest(tmp_path / "job.yaml", training=training)
    run = train(tmp_path / "run", job, tiny_model.path, data, output=tmp_path / "out")
    assert run.code == 0, run.stderr[-3000:]
    assert [outcome["outcome"] for outcome in run.outcomes] == ["Succeeded"]
    assert len(run.summaries) == 1
    summary = run.summaries[0]
    assert summary["world_size"] == 2
    assert summary["resolved"]["quantization"]["loaded_in_4bit"] is True
    assert summary["resolved"]["peft"]["kbit_prepared"] is True
    assert run.state(STEPS)["global_step"] == STEPS
    logged = run.losses(STEPS)
    assert min(loss for _, loss in logged[-3:]) < logged[0][1] - 0.05, logged


def test_invalid_input_fails_before_any_worker_starts(
    tiny_model: TinyModel, data: Path, tmp_path: Path
) -> None:
    job = manifest(tmp_path / "job.yaml", training={**TRAINING, "lora_target_modules": ["qq_proj"]})
    run = train(tmp_path / "run", job, tiny_model.path, data, output=tmp_path / "out")
    message = (
        "spec.training.lora_target_modules: no module named 'qq_proj' in the model; its linear "
        "layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    assert run.code == 2, run.stderr[-3000:]
    assert run.last_line == message
    assert run.outcomes == [{"outcome": "Failed", "reason": "InvalidInput", "message": message}]
    assert "data-parallel workers" not in run.stderr  # checked by the launcher alone
    assert "Loading weights" not in run.stderr
    assert run.summaries == []


def test_invalid_input_found_by_the_workers_is_one_outcome(
    tiny_model: TinyModel, data: Path, tmp_path: Path
) -> None:
    """An attention kernel that is not installed shows when the workers load the model: the first
    to fail is the run's outcome, reported once by the launcher, with exit code 2 and its line
    last."""
    training = {**TRAINING, "attn_implementation": "flash_attention_2"}
    job = manifest(tmp_path / "job.yaml", training=training)
    run = train(tmp_path / "run", job, tiny_model.path, data, output=tmp_path / "out")
    assert run.code == 2, run.stderr[-3000:]
    assert "starting 2 data-parallel workers" in run.stderr
    assert run.last_line.startswith("spec.training.attn_implementation 'flash_attention_2': ")
    # The worker that failed first printed it too, naming its rank; its peer was then stopped
    # (and its later outcome, if any, is not the run's).
    assert re.search(rf"^rank [01]: {re.escape(run.last_line)}$", run.stderr, re.MULTILINE)
    assert run.outcomes == [
        {"outcome": "Failed", "reason": "InvalidInput", "message": run.last_line}
    ]


def test_a_failing_rank_is_the_outcome_and_the_retry_resumes(
    tiny_model: TinyModel, data: Path, tmp_path: Path
) -> None:
    """Rank 0 fails after training (its output path is a file; rank 1 succeeds): one Failed outcome,
    exit 1 (retryable). The retry resumes from the checkpoints of the same world size, data order,
    optimizer and random state included; a retry with another world size starts over."""
    job = manifest(tmp_path / "job.yaml", training=TRAINING)
    checkpoints = tmp_path / "checkpoints"
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    first = train(
        tmp_path / "first", job, tiny_model.path, data, output=blocked, checkpoints=checkpoints
    )
    assert first.code == 1, first.stderr[-3000:]
    assert first.last_line.startswith("FileExistsError: [Errno 17] File exists:")
    assert first.outcomes == [
        {"outcome": "Failed", "reason": "TrainingError", "message": first.last_line}
    ]
    assert first.state(STEPS)["global_step"] == STEPS  # training itself was complete

    # The retry: without the final checkpoint it resumes from the one before (the cadence may
    # have skipped some: the newest left), and its last steps reproduce the weights the first
    # attempt had after them.
    final = tmp_path / "final-step"
    shutil.move(checkpoints / f"checkpoint-{STEPS}", final)
    (before,) = [path.name for path in checkpoints.glob("checkpoint-*")]
    output = tmp_path / "out"
    second = train(
        tmp_path / "second", job, tiny_model.path, data, output=output, checkpoints=checkpoints
    )
    assert second.code == 0, second.stderr[-3000:]
    assert f"resuming from {checkpoints}/{before}" in second.stderr
    assert f"step {STEPS}/{STEPS} loss" in second.stderr
    assert f"step 1/{STEPS} loss" not in second.stderr  # it did not start over
    assert [outcome["outcome"] for outcome in second.outcomes] == ["Succeeded"]
    (summary,) = second.summaries
    assert summary["resumed_from"] == before
    assert (summary["steps"], summary["world_size"]) == (STEPS, 2)
    assert_same_adapter(final, output)

    # Another world size: another plan, so its checkpoints are not resumed but removed.
    third = train(
        tmp_path / "third",
        job,
        tiny_model.path,
        data,
        output=tmp_path / "out-1",
        checkpoints=checkpoints,
        workers=1,
    )
    assert third.code == 0, third.stderr[-3000:]
    assert "removing 2 checkpoint(s) of another run plan" in third.stderr
    assert "resuming from" not in third.stderr
    single = math.ceil(76 / 4)
    assert third.state(single)["global_step"] == single
    (summary,) = third.summaries
    assert (summary["world_size"], summary["steps"], summary["resumed_from"]) == (1, single, None)


def test_sigterm_stops_every_worker_at_the_same_checkpoint(
    tiny_model: TinyModel, data: Path, tmp_path: Path
) -> None:
    """Preemption: the launcher gets SIGTERM (here: this process, which runs the launcher) and
    passes it on; the workers agree on the step to stop after, save that checkpoint together and
    report one Interrupted outcome (exit 3: the replacement resumes from it, using no retry)."""
    steps = 1500  # batch 1 x 2 workers: long enough to be stopped halfway
    training = {
        "num_input_records_to_sample": 3000,
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.002,
        "lora_r": 2,
    }
    job = manifest(tmp_path / "job.yaml", training=training)
    output = tmp_path / "out"
    first = output / "checkpoints" / f"checkpoint-{plan.save_steps(steps)}" / "trainer_state.json"
    done = threading.Event()

    def preempt() -> None:
        while not done.wait(0.05):
            if first.is_file():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=preempt, daemon=True)
    watcher.start()
    try:
        run = train(tmp_path / "run", job, tiny_model.path, data, output=output)
    finally:
        done.set()
        watcher.join()
    assert run.code == 3, run.stderr[-3000:]
    match = re.fullmatch(
        rf"training stopped at step (\d+) of {steps}; a retry resumes from checkpoint-(\d+)",
        run.last_line,
    )
    assert match, run.stderr[-3000:]
    stopped, saved = int(match.group(1)), int(match.group(2))
    assert plan.save_steps(steps) < stopped == saved < steps
    assert run.outcomes == [
        {"outcome": "Failed", "reason": "Interrupted", "message": run.last_line}
    ]
    # Both workers stopped after the same step, and saved it together.
    assert run.stderr.count(f"SIGTERM: saving a checkpoint at step {saved} and stopping") == 2
    assert run.state(saved)["global_step"] == saved
    files = {path.name for path in (run.checkpoints / f"checkpoint-{saved}").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= files
    assert run.summaries == []  # no outputs from an interrupted run


def training_args(run: Run) -> Any:
    import torch

    path = run.checkpoints / f"checkpoint-{STEPS}" / "training_args.bin"
    return torch.load(path, weights_only=False)


def planned_examples(model_dir: Path, data: Path) -> Any:
    """The training records in the order the run sees them (finetune_trainer.data)."""
    from transformers import AutoTokenizer

    from finetune_api.resource import DatasetFormat
    from finetune_trainer import data as planned

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fields = planned.Fields(text="text")
    rows = planned.read_records(str(data), DatasetFormat.JSONL, fields)
    return planned.PlannedRecords(planned.tokenize(rows, tokenizer, fields, 64), 76)


def mean_token_loss(model: Any, examples: Any, records: int) -> float:
    """The model's mean token loss over the first `records` examples."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(records):
            ids = torch.tensor([examples[index]["input_ids"]])
            targets = torch.tensor(examples[index]["labels"])[1:]
            logits = model(input_ids=ids).logits[0, :-1]
            keep = targets != -100
            loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            total += float(loss)
            count += int(keep.sum())
    return total / count


def assert_same_adapter(expected: Path, actual: Path) -> None:
    import torch
    from safetensors.torch import load_file

    want = load_file(str(expected / "adapter_model.safetensors"))
    got = load_file(str(actual / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.allclose(tensor, got[name], atol=1e-6), name
