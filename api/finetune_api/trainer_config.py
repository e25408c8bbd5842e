"""The contract between the operator and the trainer.

The operator resolves a FineTuneJob into a `TrainerConfig` (file `config.yaml` at CONFIG_MOUNT in
the training pod: a downward API volume of the pod's `finetune.dev/trainer-config` annotation). The trainer also accepts a plain FineTuneJob manifest and
builds the same object itself, with local paths from its command-line flags.

The trainer tells the outcome through its termination message (a `TrainerOutcome` JSON object at
TERMINATION_MESSAGE_PATH), so the result reaches the FineTuneJob even when live reporting is off.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_api.gpu import DEFAULT_MIN_CAPABILITY, scheme_key
from finetune_api.resource import FineTuneJobSpec, Result

CONFIG_MOUNT = "/etc/finetune"
CONFIG_KEY = "config.yaml"
PVC_MOUNT_ROOT = "/mnt/pvc"  # each distinct claim is mounted at PVC_MOUNT_ROOT/<claimName>
TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# Exit codes of finetune-trainer. The operator does not retry INVALID_INPUT: it cannot succeed.
EXIT_OK = 0
EXIT_FAILED = 1  # a runtime failure; a retry may succeed (resumes from the last checkpoint)
EXIT_INVALID_INPUT = 2  # bad spec, data, model or hardware: retrying cannot help
# Stopped by SIGTERM (pod deleted, preempted, node drained) after saving a checkpoint: the Job's
# pod failure policy ignores it, so the replacement resumes without using up a retry.
EXIT_INTERRUPTED = 3

# Environment variables the operator sets on the trainer container.
ENV_JOB_NAME = "FINETUNE_JOB_NAME"
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_REPORT = "FINETUNE_REPORT_STATUS"  # "true": patch status.progress of the FineTuneJob live
ENV_REPORT_INTERVAL = "FINETUNE_REPORT_INTERVAL"  # seconds between two progress patches
ENV_TERMINATION_PATH = "FINETUNE_TERMINATION_MESSAGE_PATH"
# Multi-node (spec.resources.nodes > 1): the pods of an Indexed Job meet in torch's c10d
# rendezvous, hosted by the pod of completion index 0 (JOB_COMPLETION_INDEX, set by the Job
# controller). The subdomain is the headless Service that gives each pod a stable name,
# <hostname>.<subdomain>.
ENV_NNODES = "FINETUNE_NNODES"
ENV_RDZV_ENDPOINT = "FINETUNE_RDZV_ENDPOINT"  # HOST:PORT of index 0
ENV_RDZV_ID = "FINETUNE_RDZV_ID"
ENV_SUBDOMAIN = "FINETUNE_SUBDOMAIN"
ENV_NODE_INDEX = "JOB_COMPLETION_INDEX"
RDZV_PORT = 29400  # torchrun's default


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, validate_default=True
    )


class JobRef(_Model):
    """The FineTuneJob a trainer run belongs to."""

    name: str
    namespace: str
    uid: str | None = None
    generation: int | None = None


class TrainerPaths(_Model):
    """Local paths as the trainer sees them."""

    model: Annotated[
        str | None,
        Field(description="Model directory; None downloads spec.model_name from the Hub."),
    ] = None
    dataset: Annotated[str, Field(description="The dataset file.")]
    output: Annotated[str, Field(description="Directory for the adapter, tokenizer and summary.")]
    checkpoints: Annotated[
        str | None, Field(description="Checkpoint directory; default <output>/checkpoints.")
    ] = None

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoints or f"{self.output.rstrip('/')}/checkpoints"


class TrainerConfig(_Model):
    """Everything a trainer run needs, resolved."""

    api_version: Annotated[Literal["finetune.dev/v1alpha1"], Field(alias="apiVersion")] = (
        "finetune.dev/v1alpha1"
    )
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job: JobRef | None = None
    spec: FineTuneJobSpec
    paths: TrainerPaths
    min_compute_capability: Annotated[
        str, Field(description="Lowest CUDA compute capability allowed for the scheme, e.g. 8.0.")
    ]
    adapter_uri: Annotated[
        str | None, Field(description="Where the adapter lands, as users see it (pvc://...).")
    ] = None

    @staticmethod
    def default_min_capability(spec: FineTuneJobSpec) -> str:
        """The documented default requirement for the spec's resolved scheme."""
        key = scheme_key(spec.training.resolved_quantization_scheme)
        return str(DEFAULT_MIN_CAPABILITY[key])


class TrainerOutcome(_Model):
    """The trainer's termination message."""

    outcome: Literal["Succeeded", "Failed"]
    reason: Annotated[
        str, Field(description="CamelCase reason, e.g. Completed, InvalidInput, TrainingError.")
    ]
    message: Annotated[str, Field(description="One line for humans.")] = ""
    result: Result | None = None
