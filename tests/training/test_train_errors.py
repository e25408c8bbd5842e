"""Bad inputs through the real CLI: exit code 2 (1 where a retry may help), one clear line last on
stderr, and that same line as the message of the Failed TrainerOutcome."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_api import ComputeCapability
from training.helpers import RunTrainer, TinyModel, manifest, text_rows, write_jsonl

pytestmark = pytest.mark.training


def check_failed(run: Any, code: int, reason: str, message: str) -> None:
    assert run.code == code, run.stderr[-2000:]
    assert run.last_line == message
    assert run.outcome == {"outcome": "Failed", "reason": reason, "message": message}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", text_rows())


SMALL = {"num_input_records_to_sample": 8, "batch_size": 4, "gradient_accumulation_steps": 1}


def test_missing_model_directory(tmp_path: Path, data: Path, run_trainer: RunTrainer) -> None:
    job = manifest(tmp_path / "job.yaml", training=SMALL)
    missing = tmp_path / "no-model"
    run = run_trainer(job, "--model", str(missing), "--data", str(data))
    check_failed(run, 2, "InvalidInput", f"model {missing}: no such directory")


def test_auto_learning_rate_for_a_model_safe_synthesizer_does_not_know(
    tmp_path: Path, data: Path, tiny_model: TinyModel, run_trainer: RunTrainer
) -> None:
    """Safe Synthesizer resolves 'auto' by the model's name and refuses a name of no class;
    "meta-llama/Llama-3.2-1B" is one (its class is called Llama32). A number runs."""
    training = {**SMALL, "pretrained_model": "meta-llama/Llama-3.2-1B"}
    job = manifest(tmp_path / "job.yaml", training=training)
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(data))
    check_failed(
        run,
        2,
        "InvalidInput",
        "spec.training.learning_rate: 'auto' needs a pretrained_model whose name contains one of "
        "TinyLlama, Qwen, Llama32, SmolLM2, SmolLM3, Mistral, Nemotron, Granite (as Safe "
        "Synthesizer matches it), and 'meta-llama/Llama-3.2-1B' contains none: set learning_rate "
        "to a number",
    )
    job = manifest(tmp_path / "job.yaml", training={**training, "learning_rate": 0.001})
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(data))
    assert run.code == 0, run.stderr[-2000:]


def test_pickled_weights_are_refused(
    tmp_path: Path, data: Path, tiny_model: TinyModel, run_trainer: RunTrainer
) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_model.path / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(b"a pickle is never loaded")
    job = manifest(tmp_path / "job.yaml", training=SMALL)
    run = run_trainer(job, "--model", str(model), "--data", str(data))
    check_failed(
        run,
        2,
        "InvalidInput",
        f"model {model}: no *.safetensors weights (only safetensors are loaded)",
    )


def test_unknown_target_module(
    tmp_path: Path, data: Path, tiny_model: TinyModel, run_trainer: RunTrainer
) -> None:
    job = manifest(tmp_path / "job.yaml", training={**SMALL, "lora_target_modules": ["qq_proj"]})
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(data))
    check_failed(
        run,
        2,
        "InvalidInput",
        "spec.training.lora_target_modules: no module named 'qq_proj' in the model; its linear "
        "layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    )


@pytest.mark.parametrize(
    ("name", "content", "dataset", "problem"),
    [
        ("empty.jsonl", "", {}, "the file is empty"),
        (
            "broken.jsonl",
            '{"text": "a b"}\n{"text": "c d"}\n{"text": "e f"\n',
            {},
            "line 3 is not valid JSON (Expecting ',' delimiter)",
        ),
        (
            "other.jsonl",
            '{"body": "a b"}\n',
            {},
            "line 1 has no field 'text' (the text field, spec.dataset.textField)",
        ),
        (
            "pairs.csv",
            "prompt,answer\nq,a\n",
            {"promptField": "prompt", "completionField": "completion"},
            "no column 'completion' (spec.dataset.completionField); its columns are: prompt, answer",
        ),
    ],
)
def test_bad_datasets(
    tmp_path: Path,
    tiny_model: TinyModel,
    run_trainer: RunTrainer,
    *,
    name: str,
    content: str,
    dataset: dict[str, Any],
    problem: str,
) -> None:
    path = tmp_path / name
    path.write_text(content)
    job = manifest(tmp_path / "job.yaml", training=SMALL, dataset={"path": name, **dataset})
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(path))
    check_failed(run, 2, "InvalidInput", f"dataset {path}: {problem}")


def test_missing_dataset_file(
    tmp_path: Path, tiny_model: TinyModel, run_trainer: RunTrainer
) -> None:
    job = manifest(tmp_path / "job.yaml", training=SMALL)
    missing = tmp_path / "nope.jsonl"
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(missing))
    check_failed(run, 2, "InvalidInput", f"dataset {missing}: no such file")


@pytest.mark.parametrize(
    ("scheme", "minimum"), [("fp8", (9, 0)), ("nvfp4", (10, 0)), ("mxfp4", (9, 0))]
)
def test_gpu_only_scheme_on_cpu(
    tmp_path: Path,
    data: Path,
    tiny_model: TinyModel,
    run_trainer: RunTrainer,
    *,
    scheme: str,
    minimum: tuple[int, int],
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("describes a machine without a GPU")
    training = {**SMALL, "quantize_model": True, "quantization_scheme": scheme}
    job = manifest(tmp_path / "job.yaml", training=training)
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(data))
    need = ComputeCapability(*minimum).describe_minimum()
    check_failed(
        run,
        2,
        "InvalidInput",
        f"quantization scheme {scheme} needs a CUDA GPU with {need}; no GPU is available",
    )
    assert "Loading weights" not in run.stderr  # refused before loading


def test_unavailable_attention_implementation(
    tmp_path: Path, data: Path, tiny_model: TinyModel, run_trainer: RunTrainer
) -> None:
    job = manifest(
        tmp_path / "job.yaml", training={**SMALL, "attn_implementation": "flash_attention_2"}
    )
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(data))
    assert run.code == 2
    assert run.last_line.startswith("spec.training.attn_implementation 'flash_attention_2': ")
    assert run.outcome is not None and run.outcome["message"] == run.last_line


def test_loftq_on_a_non_bitsandbytes_scheme(
    tmp_path: Path, data: Path, run_trainer: RunTrainer
) -> None:
    training = {
        **SMALL,
        "peft_implementation": "loftq",
        "quantize_model": True,
        "quantization_scheme": "fp8",
    }
    job = manifest(tmp_path / "job.yaml", training=training)
    run = run_trainer(job, "--data", str(data))  # refused before any download
    check_failed(
        run,
        2,
        "InvalidInput",
        f"job file {job}: spec.training.quantization_scheme: peft_implementation loftq cannot be "
        "used with "
        "quantization_scheme fp8: LoftQ needs a bitsandbytes scheme (bnb-4bit or bnb-8bit), and "
        "Safe Synthesizer's LoRA setup fails on any other",
    )


def test_invalid_manifest(tmp_path: Path, data: Path, run_trainer: RunTrainer) -> None:
    job = manifest(tmp_path / "job.yaml", training={"lora_alpha_over_r": 7})
    run = run_trainer(job, "--data", str(data))
    check_failed(
        run,
        2,
        "InvalidInput",
        f"job file {job}: spec.training.lora_alpha_over_r: Input should be less than or equal to 3",
    )


def test_hub_model_is_fetched_at_the_pinned_revision(tmp_path: Path, data: Path) -> None:
    """Without --model the trainer downloads spec.model_name at spec.model.hub.revision. Offline
    (no network here) that fails as a retryable runtime error naming the model and revision."""
    job = manifest(
        tmp_path / "job.yaml",
        training={**SMALL, "pretrained_model": "example-org/tiny-model"},
        model={"hub": {"id": "example-org/tiny-model", "revision": "abc123"}},
    )
    termination = tmp_path / "termination-log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "FINETUNE_TERMINATION_MESSAGE_PATH": str(termination),
    }
    result = subprocess.run(
        [
            *(sys.executable, "-m", "finetune_trainer.main", "--job", str(job)),
            *("--data", str(data), "--output", str(tmp_path / "out")),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert last.startswith(
        "model example-org/tiny-model (revision abc123): download from the Hugging Face Hub failed"
    )
    outcome = json.loads(termination.read_text())
    assert (outcome["outcome"], outcome["reason"], outcome["message"]) == (
        "Failed",
        "TrainingError",
        last,
    )
