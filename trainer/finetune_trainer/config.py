"""Load the job file (a FineTuneJob manifest or the operator's TrainerConfig) into a TrainerConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from finetune_api.errors import format_validation_error
from finetune_api.resource import FineTuneJob
from finetune_api.trainer_config import JobRef, TrainerConfig, TrainerPaths
from finetune_trainer.errors import InvalidInputError

_M = TypeVar("_M", TrainerConfig, FineTuneJob)


@dataclass(frozen=True)
class PathOverrides:
    """Local paths from the command line; each one set replaces the job file's."""

    model: str | None = None
    dataset: str | None = None
    output: str | None = None
    checkpoints: str | None = None


def load_trainer_config(job_file: str, overrides: PathOverrides) -> TrainerConfig:
    """Read `job_file` and return the resolved TrainerConfig, paths overridden by `overrides`."""
    document = _read_yaml(job_file)
    kind = document.get("kind")
    if kind == "TrainerConfig":
        config = _validate(TrainerConfig, document, job_file)
        return _with_overrides(config, overrides)
    if kind == "FineTuneJob":
        job = _validate(FineTuneJob, document, job_file)
        return _from_manifest(job, overrides, job_file)
    raise InvalidInputError(
        f"job file {job_file}: kind must be FineTuneJob or TrainerConfig, got {kind!r}"
    )


def _read_yaml(job_file: str) -> dict[str, Any]:
    path = Path(job_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"job file {job_file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"job file {job_file}: cannot be read ({exc})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"job file {job_file}: not valid YAML ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidInputError(
            f"job file {job_file}: expected a YAML mapping (a Kubernetes object)"
        )
    return document


def _validate(model: type[_M], document: Any, job_file: str) -> _M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise InvalidInputError(
            f"job file {job_file}: {format_validation_error(exc, root='')}"
        ) from None


def _from_manifest(job: FineTuneJob, overrides: PathOverrides, job_file: str) -> TrainerConfig:
    if overrides.dataset is None or overrides.output is None:
        raise InvalidInputError(
            f"job file {job_file} is a FineTuneJob manifest: --data and --output are required "
            "(the local dataset file and output directory)"
        )
    if overrides.model is None and job.spec.model.volume is not None:
        raise InvalidInputError(
            f"job file {job_file}: spec.model.volume names a model on a volume; pass --model with "
            "its local directory"
        )
    ref = None
    if job.metadata.name:
        ref = JobRef(
            name=job.metadata.name,
            namespace=job.metadata.namespace or "default",
            uid=job.metadata.uid,
            generation=job.metadata.generation,
        )
    return TrainerConfig(
        job=ref,
        spec=job.spec,
        paths=TrainerPaths(
            model=overrides.model,
            dataset=overrides.dataset,
            output=overrides.output,
            checkpoints=overrides.checkpoints,
        ),
        min_compute_capability=TrainerConfig.default_min_capability(job.spec),
    )


def _with_overrides(config: TrainerConfig, overrides: PathOverrides) -> TrainerConfig:
    changes = {
        field: value
        for field, value in (
            ("model", overrides.model),
            ("dataset", overrides.dataset),
            ("output", overrides.output),
            ("checkpoints", overrides.checkpoints),
        )
        if value is not None
    }
    if not changes:
        return config
    paths = config.paths.model_copy(update=changes)
    return config.model_copy(update={"paths": paths})
