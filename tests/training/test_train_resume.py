"""Preemption: SIGTERM makes the trainer checkpoint and exit 3 (interrupted: no retry used); the restarted trainer
resumes from that checkpoint instead of starting over and ends at the planned step count.

The trainer runs as a real process (the `finetune-trainer` console script), as in a pod."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_trainer import plan
from training.helpers import TinyModel, manifest, text_rows, write_jsonl

pytestmark = pytest.mark.training

# Batch 1: one record per step, of at most 16 tokens (the shortest maxSequenceLength), one LoRA
# pair per layer (q_proj: half the step time of all seven). The 950 steps after the first
# checkpoint outlast the 3 s transformers waits after SIGTERM before it checkpoints up to about
# 300 steps a second (a loaded 2-core machine does 40 to 80, with gradient checkpointing).
STEPS = 1000
FIRST_CHECKPOINT = plan.save_steps(STEPS)  # 50


def command(job: Path, model: Path, data: Path, output: Path) -> list[str]:
    script = shutil.which("finetune-trainer", path=str(Path(sys.executable).parent))
    entry = [script] if script else [sys.executable, "-m", "finetune_trainer.main"]
    return [
        *entry,
        "--job",
        str(job),
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(output),
    ]


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the trainer ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


def test_sigterm_checkpoints_and_the_restart_resumes(tiny_model: TinyModel, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", text_rows())
    training = {
        "num_input_records_to_sample": STEPS,
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.002,
        "lora_r": 2,
        "lora_target_modules": ["q_proj"],
    }
    job = manifest(tmp_path / "job.yaml", training=training, dataset={"maxSequenceLength": 16})
    output = tmp_path / "out"
    termination = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_TERMINATION_MESSAGE_PATH": str(termination)}
    env.pop("FINETUNE_REPORT_STATUS", None)
    argv = command(job, tiny_model.path, data, output)
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"

    # First attempt: preempted once the first periodic checkpoint is complete.
    with log1.open("w") as stream:
        first = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            checkpoint = output / "checkpoints" / f"checkpoint-{FIRST_CHECKPOINT}"
            wait_for(checkpoint / "trainer_state.json", first)
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=120) == 3, log1.read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
    outcome = json.loads(termination.read_text())
    assert (outcome["outcome"], outcome["reason"]) == ("Failed", "Interrupted")
    match = re.fullmatch(
        rf"training stopped at step (\d+) of {STEPS}; a retry resumes from checkpoint-(\d+)",
        outcome["message"],
    )
    assert match, outcome["message"]
    stopped, saved = int(match.group(1)), int(match.group(2))
    # The SIGTERM checkpoint is newer than the periodic one.
    assert FIRST_CHECKPOINT < saved <= stopped < STEPS
    state = json.loads(
        (output / "checkpoints" / f"checkpoint-{saved}" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == saved

    # Second attempt (the pod restarted): resumes from that checkpoint.
    termination.unlink()
    with log2.open("w") as stream:
        second = subprocess.run(
            argv, stdout=stream, stderr=subprocess.STDOUT, env=env, timeout=600, check=False
        )
    text = log2.read_text()
    assert second.returncode == 0, text[-3000:]
    assert f"resuming from {output}/checkpoints/checkpoint-{saved}" in text
    logged = [int(step) for step in re.findall(rf"step (\d+)/{STEPS} loss", text)]
    assert logged and logged[0] > saved  # it did not start over
    assert logged[-1] == STEPS
    final = json.loads(
        (output / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text()
    )
    assert final["global_step"] == STEPS  # the same count as an uninterrupted run
    summary = json.loads((output / "training_summary.json").read_text())
    assert (summary["steps"], summary["records_seen"]) == (STEPS, STEPS)
    assert summary["resumed_from"] == f"checkpoint-{saved}"
    outcome = json.loads(termination.read_text())
    assert (outcome["outcome"], outcome["result"]["steps"]) == ("Succeeded", STEPS)
    assert outcome["result"]["resumedFromStep"] == saved
    assert outcome["message"].endswith(f", resumed from step {saved}")


def test_sigterm_before_training_is_a_retryable_interruption(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", text_rows())
    job = manifest(tmp_path / "job.yaml", training={"num_input_records_to_sample": 8})
    termination = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_TERMINATION_MESSAGE_PATH": str(termination)}
    log = tmp_path / "trainer.log"
    with log.open("w") as stream:
        process = subprocess.Popen(
            command(job, tiny_model.path, data, tmp_path / "out"),
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while "finetune_trainer.hardware: device:" not in log.read_text():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)  # while the dataset and model load
            assert process.wait(timeout=120) == 3, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    outcome = json.loads(termination.read_text())
    assert (outcome["outcome"], outcome["reason"]) == ("Failed", "Interrupted")
    # Almost always still loading; on a very fast machine the Trainer may have taken over.
    assert outcome["message"].startswith(
        ("interrupted by SIGTERM outside the training loop", "training stopped at step")
    )
    assert log.read_text().strip().splitlines()[-1] == outcome["message"]
