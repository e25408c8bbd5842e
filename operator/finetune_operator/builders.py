"""Pure builders: a validated FineTuneJob in, the Kubernetes objects that run it out.

Nothing here talks to the API server; everything is unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import yaml
from kubernetes.client import (
    CoreV1ResourceClaim,
    V1Affinity,
    V1Capabilities,
    V1CELDeviceSelector,
    V1Container,
    V1DeviceClaim,
    V1DeviceRequest,
    V1DeviceSelector,
    V1DownwardAPIVolumeFile,
    V1DownwardAPIVolumeSource,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1EnvVarSource,
    V1ExactDeviceRequest,
    V1Job,
    V1JobSpec,
    V1ObjectFieldSelector,
    V1ObjectMeta,
    V1OwnerReference,
    V1PersistentVolumeClaimVolumeSource,
    V1PodFailurePolicy,
    V1PodFailurePolicyOnExitCodesRequirement,
    V1PodFailurePolicyOnPodConditionsPattern,
    V1PodFailurePolicyRule,
    V1PodResourceClaim,
    V1PodSecurityContext,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceClaimSpec,
    V1ResourceClaimTemplate,
    V1ResourceClaimTemplateSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecretKeySelector,
    V1SecurityContext,
    V1Service,
    V1ServicePort,
    V1ServiceSpec,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from finetune_api import trainer_config as tc
from finetune_api.resource import (
    API_VERSION,
    GROUP,
    KIND,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    FineTuneJobSpec,
)
from finetune_operator import dra
from finetune_operator.placement import GpuRequirement, node_affinity, same_product_affinity
from finetune_operator.settings import Settings

LABEL_UID = f"{GROUP}/job-uid"
LABEL_NAME = f"{GROUP}/job-name"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
# The trainer's config (YAML), on the training pods: a downward API volume makes it a file.
ANNOTATION_CONFIG = f"{GROUP}/trainer-config"
TRAINER_UID = 65532
TRAINER_CONTAINER = "trainer"
CACHE_DIR = "/cache"
MAX_CHILD_NAME = 52  # leaves room for the 6 characters the Job controller appends to pod names
TRAINER_JOB_SUFFIX = "train"
# The ServiceAccount training pods run as, one per namespace (trainer_identity.py).
TRAINER_ACCOUNT = "finetune-trainer"
# On SIGTERM (preemption, suspend, node drain) the trainer saves a checkpoint before it exits.
TERMINATION_GRACE_SECONDS = 300


@dataclass(frozen=True)
class JobIdentity:
    """The FineTuneJob the children belong to."""

    name: str
    namespace: str
    uid: str
    generation: int | None = None
    queue: str | None = None  # the kueue.x-k8s.io/queue-name label: Kueue admits the Job
    priority: str | None = None  # the kueue.x-k8s.io/priority-class label (a WorkloadPriorityClass)

    @property
    def queued(self) -> bool:
        return self.queue is not None

    def kueue_labels(self) -> dict[str, str]:
        """The Kueue labels the training Job carries, copied from the FineTuneJob."""
        found = {KUEUE_QUEUE_LABEL: self.queue, KUEUE_PRIORITY_LABEL: self.priority}
        return {k: v for k, v in found.items() if v is not None}


def child_name(name: str, suffix: str) -> str:
    """A deterministic child name that fits a DNS label (63) with room for pod suffixes."""
    full = f"{name}-{suffix}"
    if len(full) <= MAX_CHILD_NAME:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = MAX_CHILD_NAME - len(suffix) - len(digest) - 2
    return f"{name[:keep].rstrip('-.')}-{digest}-{suffix}"


def job_name(name: str) -> str:
    return child_name(name, TRAINER_JOB_SUFFIX)


def claim_template_name(name: str) -> str:
    return child_name(name, "gpus")


def workers_service_name(name: str) -> str:
    return child_name(name, "workers")


def rendezvous_endpoint(name: str) -> str:
    """HOST:PORT of index 0 of a multi-node job: the Job controller names an Indexed Job's pod
    <job>-<index>, and the headless Service's DNS gives it <hostname>.<subdomain>."""
    return f"{job_name(name)}-0.{workers_service_name(name)}:{tc.RDZV_PORT}"


def spec_hash(spec: FineTuneJobSpec) -> str:
    """Hash of everything that shapes the training run (suspend is handled live, so left out)."""
    data = spec.model_dump(mode="json", by_alias=True, exclude={"suspend"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def labels(job: JobIdentity) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/managed-by": "finetune-operator",
        "app.kubernetes.io/instance": child_name(job.name, "ftj")[:63].rstrip("-."),
        LABEL_UID: job.uid,
    }


def _metadata(
    job: JobIdentity, name: str, annotations: dict[str, str] | None = None
) -> V1ObjectMeta:
    owner = V1OwnerReference(
        api_version=API_VERSION,
        kind=KIND,
        name=job.name,
        uid=job.uid,
        controller=True,
        block_owner_deletion=True,
    )
    return V1ObjectMeta(
        name=name,
        namespace=job.namespace,
        labels=labels(job),
        annotations={LABEL_NAME: job.name, **(annotations or {})},
        owner_references=[owner],
    )


def _claim_mount(claim: str) -> str:
    return posixpath.join(tc.PVC_MOUNT_ROOT, claim)


def trainer_config(
    job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
) -> tc.TrainerConfig:
    """The resolved configuration the trainer reads, with paths as mounted in the pod."""
    model_path = None
    if spec.model.volume is not None:
        volume = spec.model.volume
        model_path = posixpath.join(_claim_mount(volume.claim_name), volume.normalized_path)
    return tc.TrainerConfig(
        job=tc.JobRef(
            name=job.name, namespace=job.namespace, uid=job.uid, generation=job.generation
        ),
        spec=spec,
        paths=tc.TrainerPaths(
            model=model_path,
            dataset=posixpath.join(
                _claim_mount(spec.dataset.claim_name), spec.dataset.normalized_path
            ),
            output=posixpath.join(
                _claim_mount(spec.output.claim_name), spec.output.normalized_path
            ),
        ),
        min_compute_capability=str(requirement.min_capability),
        adapter_uri=spec.output.uri,
    )


# libyaml's emitter when PyYAML has it: the pure-Python one was the costliest step of a job.
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def trainer_config_yaml(
    job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
) -> str:
    """The trainer's config file: the pod template carries it in an annotation, and a downward
    API volume shows it to the trainer as a file (no ConfigMap: one create fewer per job)."""
    config = trainer_config(job, spec, requirement)
    return yaml.dump(
        config.model_dump(mode="json", by_alias=True, exclude_none=True),
        Dumper=SAFE_DUMPER,
        sort_keys=False,
    )


def _volumes(spec: FineTuneJobSpec) -> tuple[list[V1Volume], list[V1VolumeMount]]:
    """The trainer config (from the pod's annotation), one volume per distinct claim (read-only
    unless written), and emptyDirs for the paths a read-only root filesystem still needs
    writable."""
    writable = {spec.output.claim_name}
    claims = [spec.dataset.claim_name, spec.output.claim_name]
    if spec.model.volume is not None:
        claims.insert(0, spec.model.volume.claim_name)
    config = V1DownwardAPIVolumeFile(
        path=tc.CONFIG_KEY,
        field_ref=V1ObjectFieldSelector(field_path=f"metadata.annotations['{ANNOTATION_CONFIG}']"),
    )
    volumes = [V1Volume(name="config", downward_api=V1DownwardAPIVolumeSource(items=[config]))]
    mounts = [V1VolumeMount(name="config", mount_path=tc.CONFIG_MOUNT, read_only=True)]
    for index, claim in enumerate(dict.fromkeys(claims)):
        read_only = claim not in writable
        volumes.append(
            V1Volume(
                name=f"pvc-{index}",
                persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(
                    claim_name=claim, read_only=read_only
                ),
            )
        )
        mounts.append(
            V1VolumeMount(name=f"pvc-{index}", mount_path=_claim_mount(claim), read_only=read_only)
        )
    scratch = {"tmp": ("/tmp", None), "cache": (CACHE_DIR, None), "shm": ("/dev/shm", "Memory")}
    for name, (path, medium) in scratch.items():
        volumes.append(V1Volume(name=name, empty_dir=V1EmptyDirVolumeSource(medium=medium)))
        mounts.append(V1VolumeMount(name=name, mount_path=path))
    return volumes, mounts


def _multi_node_env(job: JobIdentity, spec: FineTuneJobSpec) -> list[V1EnvVar]:
    """What each pod of a multi-node job needs to find the others (the Job controller adds
    JOB_COMPLETION_INDEX)."""
    if spec.resources.nodes == 1:
        return []
    return [
        V1EnvVar(name=tc.ENV_NNODES, value=str(spec.resources.nodes)),
        V1EnvVar(name=tc.ENV_RDZV_ENDPOINT, value=rendezvous_endpoint(job.name)),
        V1EnvVar(name=tc.ENV_RDZV_ID, value=job.uid),
        V1EnvVar(name=tc.ENV_SUBDOMAIN, value=workers_service_name(job.name)),
    ]


def _env(job: JobIdentity, spec: FineTuneJobSpec, settings: Settings) -> list[V1EnvVar]:
    env = [
        V1EnvVar(name=tc.ENV_JOB_NAME, value=job.name),
        V1EnvVar(name=tc.ENV_JOB_NAMESPACE, value=job.namespace),
        V1EnvVar(name=tc.ENV_REPORT, value="true" if settings.status_reporting else "false"),
        V1EnvVar(name=tc.ENV_REPORT_INTERVAL, value=f"{settings.progress_interval:g}"),
        V1EnvVar(name="HF_HOME", value=f"{CACHE_DIR}/huggingface"),
        V1EnvVar(name="TRITON_CACHE_DIR", value=f"{CACHE_DIR}/triton"),
        V1EnvVar(name="TMPDIR", value="/tmp"),
        *_multi_node_env(job, spec),
    ]
    hub = spec.model.hub
    if hub is not None and hub.token_secret_ref is not None:
        ref = hub.token_secret_ref
        env.append(
            V1EnvVar(
                name="HF_TOKEN",
                value_from=V1EnvVarSource(
                    secret_key_ref=V1SecretKeySelector(name=ref.name, key=ref.key)
                ),
            )
        )
    if spec.model.volume is not None:
        env.append(V1EnvVar(name="HF_HUB_OFFLINE", value="1"))
    return env


def build_workers_service(job: JobIdentity) -> V1Service:
    """Multi-node: the headless Service that gives each pod of the Indexed Job a stable name,
    <job>-<index>.<service>, resolvable before the pod is ready (the rendezvous comes first)."""
    return V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(job, workers_service_name(job.name)),
        spec=V1ServiceSpec(
            cluster_ip="None",
            selector={LABEL_UID: job.uid},
            publish_not_ready_addresses=True,
            ports=[V1ServicePort(name="rendezvous", port=tc.RDZV_PORT, protocol="TCP")],
        ),
    )


def _affinity(
    job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement, settings: Settings
) -> V1Affinity | None:
    """The GPU requirement as node affinity (device plugin; with DRA the claim places the pod)
    and, for several pods on the same GPU product, pod affinity over the product label."""
    if settings.dra:
        return None
    affinity = node_affinity(requirement, settings.labels)
    if spec.resources.nodes > 1 and spec.placement.same_gpu_product:
        affinity.pod_affinity = same_product_affinity({LABEL_UID: job.uid}, settings.labels)
    return affinity


def build_resource_claim_template(
    job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement
) -> V1ResourceClaimTemplate:
    """DRA: `resources.gpus` devices of the NVIDIA driver's DeviceClass that meet the scheme's
    compute capability and, when the model's size is known, the memory estimate. Kubernetes makes
    one ResourceClaim of it for each training pod (owned by the pod)."""
    request = V1DeviceRequest(
        name=dra.REQUEST,
        exactly=V1ExactDeviceRequest(
            device_class_name=dra.DEVICE_CLASS,
            allocation_mode="ExactCount",
            count=spec.resources.gpus,
            selectors=[
                V1DeviceSelector(cel=V1CELDeviceSelector(expression=e))
                for e in dra.selectors(requirement)
            ],
        ),
    )
    return V1ResourceClaimTemplate(
        api_version="resource.k8s.io/v1",
        kind="ResourceClaimTemplate",
        metadata=_metadata(job, claim_template_name(job.name)),
        spec=V1ResourceClaimTemplateSpec(
            metadata=V1ObjectMeta(labels=labels(job), annotations={LABEL_NAME: job.name}),
            spec=V1ResourceClaimSpec(devices=V1DeviceClaim(requests=[request])),
        ),
    )


def _resources(spec: FineTuneJobSpec, settings: Settings) -> V1ResourceRequirements:
    amounts: dict[str, str] = {}
    if not settings.dra:  # with DRA the GPUs come from the pod's ResourceClaim
        amounts[settings.gpu_resource] = str(spec.resources.gpus)
    cpu = spec.resources.cpu if spec.resources.cpu is not None else settings.default_cpu
    memory = spec.resources.memory if spec.resources.memory is not None else settings.default_memory
    if cpu is not None:
        amounts["cpu"] = str(cpu)
    if memory is not None:
        amounts["memory"] = str(memory)
    claims = [CoreV1ResourceClaim(name=dra.REQUEST)] if settings.dra else None
    return V1ResourceRequirements(
        requests=dict(amounts) or None, limits=dict(amounts) or None, claims=claims
    )


def _tolerations(spec: FineTuneJobSpec, settings: Settings) -> list[V1Toleration]:
    tolerations = [V1Toleration(key=settings.gpu_taint_key, operator="Exists", effect="NoSchedule")]
    for t in spec.placement.tolerations:
        tolerations.append(
            V1Toleration(
                key=t.key,
                operator=t.operator,
                value=t.value,
                effect=t.effect,
                toleration_seconds=t.toleration_seconds,
            )
        )
    return tolerations


def build_job(
    job: JobIdentity, spec: FineTuneJobSpec, requirement: GpuRequirement, settings: Settings
) -> V1Job:
    """The batch/v1 Job that trains: one pod, or for resources.nodes N > 1 an Indexed Job of N
    pods under the headless workers Service; restricted Pod Security, placed by GPU affinity
    (device plugin) or by the allocation of each pod's ResourceClaim (DRA)."""
    nodes = spec.resources.nodes
    volumes, mounts = _volumes(spec)
    container = V1Container(
        name=TRAINER_CONTAINER,
        image=spec.image or settings.trainer_image,
        image_pull_policy=settings.image_pull_policy,
        args=["--job", posixpath.join(tc.CONFIG_MOUNT, tc.CONFIG_KEY)],
        env=_env(job, spec, settings),
        resources=_resources(spec, settings),
        volume_mounts=mounts,
        termination_message_path=tc.TERMINATION_MESSAGE_PATH,
        termination_message_policy="FallbackToLogsOnError",
        security_context=V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=True,
            run_as_non_root=True,
            run_as_user=TRAINER_UID,
            run_as_group=TRAINER_UID,
            seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    pod = V1PodSpec(
        containers=[container],
        restart_policy="Never",
        termination_grace_period_seconds=TERMINATION_GRACE_SECONDS,
        service_account_name=TRAINER_ACCOUNT if settings.status_reporting else None,
        automount_service_account_token=settings.status_reporting,
        security_context=V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=TRAINER_UID,
            run_as_group=TRAINER_UID,
            fs_group=TRAINER_UID,
            seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
        ),
        affinity=_affinity(job, spec, requirement, settings),
        resource_claims=[
            V1PodResourceClaim(
                name=dra.REQUEST, resource_claim_template_name=claim_template_name(job.name)
            )
        ]
        if settings.dra
        else None,
        node_selector=dict(spec.placement.node_selector) or None,
        tolerations=_tolerations(spec, settings),
        priority_class_name=spec.placement.priority_class_name,
        volumes=volumes,
        subdomain=workers_service_name(job.name) if nodes > 1 else None,
    )
    template_meta = V1ObjectMeta(
        labels=labels(job),
        annotations={
            LABEL_NAME: job.name,
            ANNOTATION_CONFIG: trainer_config_yaml(job, spec, requirement),
        },
    )
    metadata = _metadata(job, job_name(job.name), {ANNOTATION_SPEC_HASH: spec_hash(spec)})
    metadata.labels = {**metadata.labels, **job.kueue_labels()}
    return V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=metadata,
        spec=V1JobSpec(
            # Several pods: one failure may fail them all (index 0 hosts the rendezvous).
            backoff_limit=spec.backoff_limit * nodes,
            active_deadline_seconds=spec.active_deadline_seconds,
            completions=nodes,
            parallelism=nodes,
            completion_mode="Indexed" if nodes > 1 else None,
            # A queued Job starts suspended and only Kueue unsuspends it (on admission); the
            # operator never touches its suspend (spec.suspend becomes the Workload's active).
            suspend=True if job.queued else spec.suspend,
            pod_failure_policy=pod_failure_policy(),
            # A replacement starts only once the old pod has stopped (and written its checkpoint).
            pod_replacement_policy="Failed",
            template=V1PodTemplateSpec(metadata=template_meta, spec=pod),
        ),
    )


def pod_failure_policy() -> V1PodFailurePolicy:
    """Fail at once when the trainer says retrying cannot help. A pod stopped from outside is
    replaced without using a retry: a disrupted one (preemption, eviction, node drain: the
    DisruptionTarget condition), and one whose trainer stopped on SIGTERM after saving a
    checkpoint (a deleted pod gets no DisruptionTarget; the trainer's exit code says it)."""
    return V1PodFailurePolicy(
        rules=[
            V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=V1PodFailurePolicyOnExitCodesRequirement(
                    container_name=TRAINER_CONTAINER,
                    operator="In",
                    values=[tc.EXIT_INVALID_INPUT],
                ),
            ),
            V1PodFailurePolicyRule(
                action="Ignore",
                on_exit_codes=V1PodFailurePolicyOnExitCodesRequirement(
                    container_name=TRAINER_CONTAINER,
                    operator="In",
                    values=[tc.EXIT_INTERRUPTED],
                ),
            ),
            V1PodFailurePolicyRule(
                action="Ignore",
                on_pod_conditions=[
                    V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")
                ],
            ),
        ]
    )
