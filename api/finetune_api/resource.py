"""The FineTuneJob custom resource: typed spec and status. The CRD is generated from these models.

Kubernetes-side fields are camelCase (attributes are snake_case, aliases camelCase); the
`training` block is Safe Synthesizer's snake_case `TrainingHyperparams`, unchanged.
"""

from __future__ import annotations

import enum
import posixpath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_api.kube_fields import (
    IMAGE,
    MAX_NAME,
    MAX_PATH,
    KubeModel,
    Placement,
    ResourceName,
    Resources,
    SecretKeyRef,
)
from finetune_api.rules import cel_rule
from finetune_api.training import TrainingHyperparams

DEFAULT_MODEL: str = TrainingHyperparams.model_fields["pretrained_model"].default
# Schedulers that step on the validation loss: they need a validation split.
METRIC_SCHEDULERS = frozenset({"reduce_lr_on_plateau", "greedy"})

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)


class VolumePath(KubeModel):
    """A path inside a PersistentVolumeClaim in the FineTuneJob's namespace."""

    claim_name: Annotated[ResourceName, Field(description="Name of the PersistentVolumeClaim.")]
    path: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_PATH,
            pattern=r"^[^/]",
            description="Path inside the volume, relative to its root (no leading '/', no '..').",
        ),
    ]

    @cel_rule(
        "!self.path.matches('(^|/)[.][.](/|$)')",
        "must stay inside the volume: '..' is not allowed",
        field_path=".path",
    )
    def _stays_inside(self) -> bool:
        return ".." not in self.path.split("/")

    @property
    def normalized_path(self) -> str:
        """The path with redundant separators and '.' segments removed."""
        return posixpath.normpath(self.path)

    @property
    def uri(self) -> str:
        """A display form, pvc://CLAIM/PATH."""
        return f"pvc://{self.claim_name}/{self.normalized_path}"


class HubModel(KubeModel):
    """Download the base model from the Hugging Face Hub."""

    id: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_PATH,
            description=(
                "Hub model id, e.g. meta-llama/Llama-3.2-1B. Optional: when set it must equal "
                "spec.training.pretrained_model, which names the model."
            ),
        ),
    ] = None
    revision: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_NAME,
            pattern=r"^[^\s]+$",
            description="Branch, tag or commit to pin; the default branch if unset.",
        ),
    ] = None
    token_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(
            description=(
                "Secret key holding a Hub access token, for gated or private models. It reaches "
                "the trainer as the HF_TOKEN environment variable and is never copied."
            )
        ),
    ] = None


class ModelSource(KubeModel):
    """Where the base model comes from, and what the scheduler should know about its size."""

    hub: Annotated[
        HubModel | None, Field(description="Load the model from the Hugging Face Hub (default).")
    ] = None
    volume: Annotated[
        VolumePath | None,
        Field(
            description=(
                "Load the model from a directory on a PersistentVolumeClaim (for air-gapped "
                "clusters). Exclusive with hub."
            )
        ),
    ] = None
    parameters_billions: Annotated[
        float | None,
        Field(
            gt=0,
            description=(
                "Model size in billions of parameters, for the GPU memory estimate. Needed only "
                "for models the operator's table does not know."
            ),
        ),
    ] = None
    trust_remote_code: Annotated[
        bool,
        Field(
            description=(
                "Allow the model repository's own Python code to run in the trainer. Off by default; "
                "turn on only for sources you trust."
            )
        ),
    ] = False

    @cel_rule("!(has(self.hub) && has(self.volume))", "set either hub or volume, not both")
    def _one_source(self) -> bool:
        return self.hub is None or self.volume is None


class DatasetFormat(enum.StrEnum):
    """File formats the trainer reads."""

    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DatasetSource(VolumePath):
    """The training data: one jsonl, csv or parquet file on a PersistentVolumeClaim."""

    format: Annotated[
        DatasetFormat | None,
        Field(
            strict=False,  # the enum's string values are what the wire carries
            description="File format; inferred from the file extension when unset.",
        ),
    ] = None
    text_field: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_NAME,
            description=(
                "Column holding each record's full training text. Defaults to 'text' unless "
                "promptField and completionField are set."
            ),
        ),
    ] = None
    prompt_field: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_NAME,
            description="Column holding the prompt; the loss is computed on the completion only.",
        ),
    ] = None
    completion_field: Annotated[
        str | None,
        Field(
            min_length=1, max_length=MAX_NAME, description="Column holding the completion to learn."
        ),
    ] = None
    max_sequence_length: Annotated[
        int,
        Field(
            ge=16,
            le=1_048_576,
            description="Longest training sequence in tokens; longer records are truncated.",
        ),
    ] = 2048

    @cel_rule(
        "has(self.promptField) == has(self.completionField)",
        "promptField and completionField must be set together",
    )
    def _prompt_with_completion(self) -> bool:
        return (self.prompt_field is None) == (self.completion_field is None)

    @cel_rule(
        "!(has(self.textField) && has(self.promptField))",
        "set either textField or promptField/completionField, not both",
    )
    def _text_or_prompt(self) -> bool:
        return self.prompt_field is None or self.text_field is None

    @cel_rule(
        "has(self.format) || self.path.lowerAscii().matches('(^|/)[^/]*[^./][^/]*[.](jsonl|json|csv|parquet)$')",
        "format is unset and path {path} has no known extension (.jsonl, .json, .csv, .parquet)",
        field_path=".format",
    )
    def _format_known(self) -> bool:
        return self.format is not None or self.inferred_format is not None

    @property
    def inferred_format(self) -> DatasetFormat | None:
        extension = posixpath.splitext(self.path)[1].lower()
        return DatasetFormat(_EXTENSIONS[extension]) if extension in _EXTENSIONS else None

    @property
    def resolved_format(self) -> DatasetFormat:
        """The explicit format, else the one the extension names."""
        resolved = self.format or self.inferred_format
        assert resolved is not None  # guaranteed by the validator
        return resolved

    @property
    def resolved_text_field(self) -> str | None:
        """The text column, None when prompt/completion fields are used."""
        if self.prompt_field is not None:
            return None
        return self.text_field or "text"


class OutputTarget(VolumePath):
    """Where the trained adapter, tokenizer and training summary are written."""


class FineTuneJobSpec(KubeModel):
    """What to fine-tune, on which data, where to write the adapter, and on what hardware."""

    training: Annotated[
        TrainingHyperparams,
        Field(description="Training hyperparameters (NeMo Safe Synthesizer's training block)."),
    ] = Field(default_factory=TrainingHyperparams)
    model: Annotated[ModelSource, Field(description="Where the base model comes from.")] = Field(
        default_factory=ModelSource
    )
    dataset: Annotated[DatasetSource, Field(description="The training data.")]
    output: Annotated[OutputTarget, Field(description="Where the adapter is written.")]
    resources: Annotated[
        Resources, Field(description="Pods, GPUs, CPU and memory for the training.")
    ] = Field(default_factory=Resources)
    placement: Annotated[
        Placement, Field(description="Extra node selection, tolerations and priority.")
    ] = Field(default_factory=Placement)
    image: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_PATH,
            pattern=IMAGE,
            description="Trainer image (no whitespace); the operator's default when unset.",
        ),
    ] = None
    suspend: Annotated[
        bool,
        Field(description="While true no training pod runs; a running one is stopped."),
    ] = False
    backoff_limit: Annotated[
        int,
        Field(
            ge=0,
            le=100,
            description=(
                "Pod retries before the job is Failed (per pod with resources.nodes > 1); a "
                "retry resumes from the last checkpoint."
            ),
        ),
    ] = 2
    active_deadline_seconds: Annotated[
        int | None,
        Field(
            ge=1,
            le=2**31 - 1,
            description="Wall-clock limit for the whole job; it fails when exceeded.",
        ),
    ] = None

    # Combinations Safe Synthesizer accepts but cannot train (its run would fail in transformers or
    # in its data assembly), refused before anything is scheduled. (loftq with a non-bitsandbytes
    # scheme is TrainingHyperparams' own rule.)
    @cel_rule(
        f"!(self.training.lr_scheduler in {sorted(METRIC_SCHEDULERS)!r})"
        " || self.training.validation_ratio > 0.0",
        "lr_scheduler {training.lr_scheduler} adjusts the learning rate on the validation loss: "
        "set validation_ratio > 0 (transformers refuses this scheduler without evaluation)",
        field_path=".training.validation_ratio",
    )
    def _metric_scheduler_validates(self) -> bool:
        training = self.training
        return training.lr_scheduler not in METRIC_SCHEDULERS or training.validation_ratio > 0

    @cel_rule(
        "!has(self.training.num_input_records_to_sample)"
        " || self.training.num_input_records_to_sample != 0",
        "num_input_records_to_sample 0 means no training step: set a positive count or 'auto' "
        "(Safe Synthesizer's run fails with no example to train on)",
        field_path=".training.num_input_records_to_sample",
    )
    def _trains_something(self) -> bool:
        return self.training.num_input_records_to_sample != 0

    # One rule for the model's name: training.pretrained_model names it (Safe Synthesizer's
    # field, with its default); model.hub.id is optional and, when set, must say the same. (The
    # CRD applies pretrained_model's default, so "only one is set" cannot be told apart from
    # "both are set"; agreement can.)
    @cel_rule(
        "!has(self.model.hub) || !has(self.model.hub.id)"
        " || self.training.pretrained_model == self.model.hub.id",
        "model.hub.id {model.hub.id} and training.pretrained_model {training.pretrained_model} "
        "name different models: training.pretrained_model names the model; leave model.hub.id "
        "out or set it to the same name",
        field_path=".model.hub.id",
    )
    def _one_model_name(self) -> bool:
        hub_id = self.model.hub.id if self.model.hub else None
        return hub_id is None or self.training.pretrained_model == hub_id

    @property
    def model_name(self) -> str:
        """The model's name: training.pretrained_model (model.hub.id, when set, is the same)."""
        return self.training.pretrained_model


# Kueue's own label: on a FineTuneJob it names the LocalQueue the training Job is submitted to
# (the operator copies it, and the WorkloadPriorityClass label, onto the Job).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


class Phase(enum.StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    ADMITTED = "Admitted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ConditionType(enum.StrEnum):
    VALIDATED = "Validated"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    COMPLETE = "Complete"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    SPEC_CHANGED = "SpecChanged"
    CHILDREN = "ChildrenReady"
    ADMITTED = "Admitted"


class StatusModel(BaseModel):
    """Base for status models: camelCase, and tolerant of fields written by newer versions."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class Condition(StatusModel):
    """One aspect of the job's state, in the Kubernetes condition convention."""

    type: Annotated[
        str,
        Field(
            description=(
                "Validated, Scheduled, Running, Complete, Failed, Suspended, SpecChanged, "
                "ChildrenReady or Admitted (Kueue's admission of a queued job)."
            )
        ),
    ]
    status: Annotated[
        Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")
    ]
    reason: Annotated[str, Field(description="CamelCase reason for the last transition.")] = ""
    message: Annotated[str, Field(description="Human-readable detail.")] = ""
    last_transition_time: Annotated[
        str | None, Field(description="When status last changed (RFC 3339).")
    ] = None
    observed_generation: Annotated[
        int | None, Field(description="metadata.generation this condition was computed from.")
    ] = None


class PlacementStatus(StatusModel):
    """The GPU requirement derived from the spec, and where the training pod landed."""

    scheme: Annotated[
        str | None, Field(description="Resolved quantization scheme, or 'none' for plain LoRA.")
    ] = None
    required_compute_capability: Annotated[
        str | None, Field(description="Lowest CUDA compute capability that can run the scheme.")
    ] = None
    architecture: Annotated[
        str | None, Field(description="Oldest GPU architecture that qualifies, e.g. Hopper.")
    ] = None
    estimated_gpu_memory_mib: Annotated[
        int | None,
        Field(
            alias="estimatedGpuMemoryMiB",
            description="Estimated GPU memory per GPU in MiB (after max_vram_fraction).",
        ),
    ] = None
    node: Annotated[str | None, Field(description="Node the training pod was bound to.")] = None
    nodes: Annotated[
        list[Annotated[str, Field(max_length=253)]] | None,
        Field(
            max_length=64,
            description="Several pods (resources.nodes > 1): the node of each pod, by index, "
            "once all are bound (node is the newest pod's).",
        ),
    ] = None
    gpu_product: Annotated[
        str | None,
        Field(
            description="The GPU product: the node's nvidia.com/gpu.product label, or the "
            "allocated device's productName (DRA)."
        ),
    ] = None
    node_compute_capability: Annotated[
        str | None, Field(description="The GPU's compute capability (node label or device).")
    ] = None
    resource_claim: Annotated[
        str | None,
        Field(description="DRA: the training pod's ResourceClaim, made from the job's template."),
    ] = None
    gpu_devices: Annotated[
        list[Annotated[str, Field(max_length=512)]] | None,
        Field(
            max_length=64,
            description="DRA: the devices allocated to the claim, as POOL/DEVICE (the NVIDIA "
            "driver names the pool after the node), e.g. gpu-node-1/gpu-0.",
        ),
    ] = None


class QueueStatus(StatusModel):
    """Where Kueue holds or admitted the job (only for a FineTuneJob with a queue-name label)."""

    local_queue: Annotated[str | None, Field(description="The LocalQueue named by the label.")] = (
        None
    )
    workload: Annotated[str | None, Field(description="Kueue's Workload for the Job.")] = None
    cluster_queue: Annotated[
        str | None, Field(description="The ClusterQueue that admitted the Workload.")
    ] = None
    flavors: Annotated[
        list[str], Field(description="ResourceFlavors Kueue assigned, one per resource.")
    ] = Field(default_factory=list)
    evictions: Annotated[
        int | None,
        Field(description="How often Kueue evicted the Workload (preemption, deactivation)."),
    ] = None


class Progress(StatusModel):
    """Live training progress, reported by the trainer."""

    step: Annotated[int | None, Field(description="Optimizer steps done.")] = None
    total_steps: Annotated[int | None, Field(description="Optimizer steps planned.")] = None
    epoch: Annotated[float | None, Field(description="Epochs done (fractional).")] = None
    loss: Annotated[float | None, Field(description="Latest training loss.")] = None
    eval_loss: Annotated[float | None, Field(description="Latest validation loss.")] = None
    percent: Annotated[int | None, Field(ge=0, le=100, description="Percent of steps done.")] = None
    update_time: Annotated[str | None, Field(description="When the trainer last reported.")] = None


class Result(StatusModel):
    """What a successful run produced."""

    adapter: Annotated[str | None, Field(description="Adapter location, pvc://CLAIM/PATH.")] = None
    steps: Annotated[int | None, Field(description="Optimizer steps run.")] = None
    records_seen: Annotated[int | None, Field(description="Training records consumed.")] = None
    final_loss: Annotated[float | None, Field(description="Last training loss.")] = None
    eval_loss: Annotated[float | None, Field(description="Last validation loss.")] = None
    duration_seconds: Annotated[float | None, Field(description="Training wall time.")] = None
    resumed_from_step: Annotated[
        int | None,
        Field(
            ge=0,
            description="The checkpoint step the successful attempt resumed from (after a "
            "preemption, a deleted pod or a failure); unset when it trained from the start.",
        ),
    ] = None


class FineTuneJobStatus(StatusModel):
    """Observed state, written by the operator and the trainer only."""

    phase: Annotated[
        Phase | None,
        Field(description="Pending, Queued, Admitted, Running, Succeeded, Failed or Suspended."),
    ] = None
    message: Annotated[
        str | None,
        Field(
            description="One line on the current phase: why it waits, where it runs, what it produced."
        ),
    ] = None
    conditions: Annotated[
        list[Condition], Field(description="Current conditions, one per type.")
    ] = Field(default_factory=list)
    observed_generation: Annotated[
        int | None, Field(description="metadata.generation the status reflects.")
    ] = None
    job_name: Annotated[str | None, Field(description="Name of the training batch/v1 Job.")] = None
    placement: Annotated[PlacementStatus | None, Field(description="GPU requirement and node.")] = (
        None
    )
    queue: Annotated[QueueStatus | None, Field(description="Kueue's admission of the job.")] = None
    progress: Annotated[Progress | None, Field(description="Live training progress.")] = None
    result: Annotated[Result | None, Field(description="Adapter location and final metrics.")] = (
        None
    )
    start_time: Annotated[str | None, Field(description="When the training pod started.")] = None
    completion_time: Annotated[str | None, Field(description="When the job finished.")] = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectMeta(BaseModel):
    """The few metadata fields the API uses; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None


class FineTuneJob(BaseModel):
    """A whole FineTuneJob object, as applied with kubectl or read from the API server."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Annotated[Literal["finetune.dev/v1alpha1"], Field(alias="apiVersion")] = (
        "finetune.dev/v1alpha1"
    )
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> FineTuneJob:
        return cls.model_validate(obj)
