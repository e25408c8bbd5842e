"""finetune.dev/v1alpha1 API types: pure pydantic, importable without torch, transformers or kopf."""

from finetune_api.errors import format_validation_error
from finetune_api.gpu import DEFAULT_MIN_CAPABILITY, ComputeCapability
from finetune_api.resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Condition,
    ConditionType,
    DatasetFormat,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
)
from finetune_api.training import QuantizationScheme, TrainingHyperparams

__all__ = [
    "API_VERSION",
    "DEFAULT_MIN_CAPABILITY",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ComputeCapability",
    "Condition",
    "ConditionType",
    "DatasetFormat",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Phase",
    "QuantizationScheme",
    "TrainingHyperparams",
    "format_validation_error",
]
