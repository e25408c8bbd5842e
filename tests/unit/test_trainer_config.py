"""The job file: a FineTuneJob manifest or the operator's TrainerConfig, with path flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.trainer_config import TrainerConfig
from finetune_trainer.config import PathOverrides, load_trainer_config
from finetune_trainer.errors import InvalidInputError

MANIFEST: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "dataset": {"claimName": "data", "path": "train.jsonl"},
        "output": {"claimName": "out", "path": "demo"},
        "training": {"quantize_model": True, "quantization_scheme": "fp8"},
    },
}


def write(tmp_path: Path, document: Any, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return str(path)


def test_manifest_becomes_a_trainer_config(tmp_path: Path) -> None:
    job = write(tmp_path, MANIFEST)
    config = load_trainer_config(job, PathOverrides(dataset="/d/train.jsonl", output="/o"))
    assert config.job is not None
    assert (config.job.name, config.job.namespace) == ("demo", "ml")
    assert config.paths.model is None  # the Hub: spec.model_name
    assert config.spec.model_name == "HuggingFaceTB/SmolLM3-3B"
    assert (config.paths.dataset, config.paths.output) == ("/d/train.jsonl", "/o")
    assert config.paths.checkpoint_dir == "/o/checkpoints"
    assert config.min_compute_capability == "9.0"  # the documented default for fp8
    assert config.min_compute_capability == TrainerConfig.default_min_capability(config.spec)


def test_manifest_needs_data_and_output(tmp_path: Path) -> None:
    job = write(tmp_path, MANIFEST)
    with pytest.raises(InvalidInputError, match=r"--data and --output are required"):
        load_trainer_config(job, PathOverrides(dataset="/d/train.jsonl"))


def test_manifest_with_a_volume_model_needs_model_flag(tmp_path: Path) -> None:
    document = yaml.safe_load(yaml.safe_dump(MANIFEST))
    document["spec"]["model"] = {"volume": {"claimName": "models", "path": "llama"}}
    job = write(tmp_path, document)
    with pytest.raises(InvalidInputError, match=r"spec.model.volume .* pass --model"):
        load_trainer_config(job, PathOverrides(dataset="/d", output="/o"))
    config = load_trainer_config(job, PathOverrides(model="/m", dataset="/d", output="/o"))
    assert config.paths.model == "/m"


def test_trainer_config_paths_and_flags_override_them(tmp_path: Path) -> None:
    document = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "TrainerConfig",
        "job": {"name": "demo", "namespace": "ml", "uid": "u-1"},
        "spec": MANIFEST["spec"],
        "paths": {"model": "/mnt/m", "dataset": "/mnt/d.jsonl", "output": "/mnt/o"},
        "minComputeCapability": "9.0",
        "adapterUri": "pvc://out/demo",
    }
    job = write(tmp_path, document)
    as_is = load_trainer_config(job, PathOverrides())
    assert as_is.paths.model == "/mnt/m"
    assert as_is.adapter_uri == "pvc://out/demo"
    moved = load_trainer_config(job, PathOverrides(output="/tmp/o", checkpoints="/tmp/c"))
    assert (moved.paths.model, moved.paths.dataset) == ("/mnt/m", "/mnt/d.jsonl")
    assert (moved.paths.output, moved.paths.checkpoint_dir) == ("/tmp/o", "/tmp/c")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: [unclosed", r"job file .*job.yaml: not valid YAML"),
        ("- a\n- b\n", r"job file .*job.yaml: expected a YAML mapping"),
        (
            {"kind": "Pod"},
            r"job file .*job.yaml: kind must be FineTuneJob or TrainerConfig, got 'Pod'",
        ),
        (
            {**MANIFEST, "spec": {**MANIFEST["spec"], "training": {"lora_r": 0}}},
            r"^job file .*job.yaml: spec.training.lora_r: Input should be greater than 0$",
        ),
    ],
)
def test_bad_job_files_are_one_line(tmp_path: Path, content: Any, message: str) -> None:
    job = write(tmp_path, content)
    with pytest.raises(InvalidInputError, match=message) as error:
        load_trainer_config(job, PathOverrides(dataset="/d", output="/o"))
    assert "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"job file .*nope.yaml: no such file"):
        load_trainer_config(str(tmp_path / "nope.yaml"), PathOverrides())
