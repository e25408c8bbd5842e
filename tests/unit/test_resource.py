"""The FineTuneJob resource model: camelCase fields, cross-field rules, the example manifest."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from crdschema import schema_errors
from finetune_api import (
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    QuantizationScheme,
    format_validation_error,
)
from finetune_api.resource import DatasetFormat

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "finetune.yaml"

MINIMAL: dict[str, Any] = {
    "dataset": {"claimName": "data", "path": "train.jsonl"},
    "output": {"claimName": "out", "path": "adapter"},
}


def spec_error(spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        FineTuneJobSpec.model_validate(spec)
    return format_validation_error(info.value, "spec")


def with_(**parts: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    spec.update(parts)
    return spec


def test_example_manifest_is_a_bnb_4bit_qlora_job() -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    job = FineTuneJob.model_validate(manifest)
    assert job.spec.training.resolved_quantization_scheme is QuantizationScheme.BNB_4BIT
    assert job.spec.training.peft_method == "qlora"
    assert schema_errors(manifest) == []


def test_minimal_spec_gets_defaults() -> None:
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    assert spec.resources.gpus == 1
    assert spec.suspend is False
    assert spec.backoff_limit == 2
    assert spec.model.trust_remote_code is False
    assert spec.model_name == "HuggingFaceTB/SmolLM3-3B"
    assert spec.dataset.resolved_format is DatasetFormat.JSONL
    assert spec.dataset.resolved_text_field == "text"
    assert spec.dataset.max_sequence_length == 2048
    assert spec.placement.node_selector == {}
    assert (
        schema_errors(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "x"},
                "spec": MINIMAL,
            }
        )
        == []
    )


def test_camel_case_on_the_wire() -> None:
    spec = FineTuneJobSpec.model_validate(
        with_(
            placement={"nodeSelector": {"pool": "gpu"}, "priorityClassName": "batch"},
            activeDeadlineSeconds=3600,
        )
    )
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["placement"]["nodeSelector"] == {"pool": "gpu"}
    assert dumped["activeDeadlineSeconds"] == 3600
    assert "lora_r" in dumped["training"]  # the training block stays snake_case


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"output": MINIMAL["output"]}, "spec.dataset: Field required"),
        (
            with_(dataset={"claimName": "Data_Bad", "path": "a.jsonl"}),
            "spec.dataset.claimName: String should match pattern",
        ),
        (
            with_(dataset={"claimName": "data", "path": "/abs.jsonl"}),
            "spec.dataset.path: String should match pattern",
        ),
        (
            with_(dataset={"claimName": "data", "path": "../escape.jsonl"}),
            "spec.dataset.path: must stay inside the volume",
        ),
        (
            with_(dataset={"claimName": "data", "path": "train.txt"}),
            "spec.dataset.format: format is unset and path train.txt has no known extension",
        ),
        (
            with_(dataset={"claimName": "data", "path": "t.csv", "promptField": "q"}),
            "spec.dataset: promptField and completionField must be set together",
        ),
        (
            with_(
                dataset={
                    "claimName": "data",
                    "path": "t.csv",
                    "textField": "t",
                    "promptField": "q",
                    "completionField": "a",
                }
            ),
            "spec.dataset: set either textField or promptField/completionField",
        ),
        (
            with_(dataset={"claimName": "data", "path": "t.csv", "maxSequenceLength": 8}),
            "spec.dataset.maxSequenceLength: Input should be greater than or equal to 16",
        ),
        (
            with_(resources={"gpus": 0}),
            "spec.resources.gpus: Input should be greater than or equal to 1",
        ),
        (with_(resources={"memory": "lots"}), "spec.resources.memory"),
        (
            with_(model={"hub": {"id": "a/b"}, "volume": {"claimName": "m", "path": "b"}}),
            "spec.model: set either hub or volume, not both",
        ),
        (
            with_(model={"hub": {"id": "a/b"}}, training={"pretrained_model": "c/d"}),
            "spec.model.hub.id: model.hub.id a/b and training.pretrained_model c/d name different models",
        ),
        (
            with_(model={"parametersBillions": 0}),
            "spec.model.parametersBillions: Input should be greater than 0",
        ),
        (with_(backoffLimit=-1), "spec.backoffLimit: Input should be greater than or equal to 0"),
        (
            with_(activeDeadlineSeconds=0),
            "spec.activeDeadlineSeconds: Input should be greater than or equal to 1",
        ),
        (
            with_(placement={"tolerations": [{"operator": "Sometimes"}]}),
            "spec.placement.tolerations[0].operator",
        ),
        (
            with_(
                training={
                    "quantize_model": True,
                    "quantization_scheme": "nvfp4",
                    "peft_implementation": "loftq",
                }
            ),
            "spec.training.quantization_scheme: peft_implementation loftq cannot be used with "
            "quantization_scheme nvfp4",
        ),
        (with_(trainingg={}), "spec.trainingg: unknown field"),
        (
            with_(training={"lora_target_modules": []}),
            "spec.training.lora_target_modules: must name at least one module",
        ),
        (
            with_(training={"lr_scheduler": "reduce_lr_on_plateau"}),
            "spec.training.validation_ratio: lr_scheduler reduce_lr_on_plateau adjusts the learning rate on the validation loss",
        ),
        (
            with_(training={"lr_scheduler": "greedy", "validation_ratio": 0}),
            "spec.training.validation_ratio: lr_scheduler greedy",
        ),
        (
            with_(training={"num_input_records_to_sample": 0}),
            "spec.training.num_input_records_to_sample: num_input_records_to_sample 0 means no training step",
        ),
    ],
)
def test_bad_specs_give_one_line_naming_the_field(spec: dict[str, Any], expected: str) -> None:
    message = spec_error(spec)
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "training",
    [
        {"peft_implementation": "LoftQ", "quantize_model": True, "quantization_bits": 4},
        {"lr_scheduler": "reduce_lr_on_plateau", "validation_ratio": 0.1},
        {"num_input_records_to_sample": 1},
        # Safe Synthesizer runs these (loftq only applies to a quantized base, and only spelled
        # exactly 'loftq'), so they must pass here too.
        {"peft_implementation": "loftq"},
        {"peft_implementation": "loftq", "quantization_scheme": "nvfp4"},
        {"peft_implementation": "LOFTQ", "quantize_model": True, "quantization_scheme": "fp8"},
    ],
)
def test_runnable_combinations_pass(training: dict[str, Any]) -> None:
    FineTuneJobSpec.model_validate(with_(training=training))


def test_prompt_completion_dataset() -> None:
    spec = FineTuneJobSpec.model_validate(
        with_(
            dataset={
                "claimName": "d",
                "path": "x/y.parquet",
                "promptField": "q",
                "completionField": "a",
            }
        )
    )
    assert spec.dataset.resolved_text_field is None
    assert spec.dataset.resolved_format is DatasetFormat.PARQUET
    assert spec.dataset.uri == "pvc://d/x/y.parquet"


def test_hub_id_must_repeat_pretrained_model() -> None:
    """One rule for the model's name: training.pretrained_model names it; model.hub.id may only
    repeat it. The default pretrained_model no longer gives way silently to a different hub.id."""
    error = spec_error(with_(model={"hub": {"id": "meta-llama/Llama-3.2-1B", "revision": "v1"}}))
    assert error == (
        "spec.model.hub.id: model.hub.id meta-llama/Llama-3.2-1B and training.pretrained_model "
        "HuggingFaceTB/SmolLM3-3B name different models: training.pretrained_model names the "
        "model; leave model.hub.id out or set it to the same name"
    )
    same = FineTuneJobSpec.model_validate(
        with_(model={"hub": {"id": "a/b"}}, training={"pretrained_model": "a/b"})
    )
    assert same.model_name == "a/b"


def test_status_round_trip_ignores_unknown_fields() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Running",
            "observedGeneration": 3,
            "conditions": [
                {"type": "Scheduled", "status": "True", "reason": "Bound", "message": "node a"}
            ],
            "placement": {"estimatedGpuMemoryMiB": 9000, "node": "a"},
            "progress": {"step": 3, "totalSteps": 10, "percent": 30, "evalLoss": 1.5},
            "kopf": {"progress": {}},
        }
    )
    assert status.condition("Scheduled") is not None
    assert status.placement is not None and status.placement.estimated_gpu_memory_mib == 9000
    assert status.progress is not None and status.progress.eval_loss == 1.5
    assert status.model_dump(by_alias=True, exclude_none=True)["progress"]["totalSteps"] == 10
