"""Every kopf decorator of the operator, and nothing else: each handler is a call or two.

`configure()` must run before kopf starts (main does it): it installs the settings and the
Reconciler the handlers use.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException

from finetune_api.resource import GROUP, PLURAL, VERSION
from finetune_operator import trainer_identity, tuning, webhook
from finetune_operator.builders import LABEL_NAME, LABEL_UID, job_name
from finetune_operator.kube import Kube, api_message, load_config
from finetune_operator.kueue import GROUP as KUEUE_GROUP
from finetune_operator.kueue import JOB_UID_LABEL
from finetune_operator.kueue import VERSION as KUEUE_VERSION
from finetune_operator.observe import JobView, PodView
from finetune_operator.placement import GpuNode
from finetune_operator.reconcile import Reconciler, Seen
from finetune_operator.settings import Settings
from finetune_operator.status import awaits_pod

FTJ = (GROUP, VERSION, PLURAL)
log = logging.getLogger(__name__)
CHILD_LABELS: dict[str, Any] = {LABEL_UID: kopf.PRESENT}
RETRY_SECONDS = 60  # a child refused for a reason that may pass (quota, RBAC, a webhook down)
TICK_SECONDS = 30  # how often a job that waits for its pod is looked at (FailedCreate, lost Job)
# Changes of a job's Job and pods come in flurries (created, scheduled, started: a few events
# within a fraction of a second): one status refresh a moment after the first serves them all.
REFRESH_DELAY_SECONDS = 0.25
LOOK_TIMEOUT_SECONDS = 120  # a worker thread never waits for ever on a loop that has stopped


_state: dict[str, Any] = {}


def configure(settings: Settings) -> None:
    load_config()
    _state["settings"] = settings
    _state["reconciler"] = Reconciler(settings, Kube(), _post_event, _look)
    if not settings.dra:
        # The GPU nodes, for the placement shown in the status and why a pod cannot be placed
        # (with DRA the ResourceSlices say that).
        kopf.index("", "v1", "nodes", labels={settings.labels.compute_major: kopf.PRESENT})(
            gpu_nodes
        )
    else:
        # The ResourceClaimTemplate is a child only with DRA (and the chart's RBAC has it then).
        kopf.on.event("resource.k8s.io", "v1", "resourceclaimtemplates", labels=CHILD_LABELS)(
            child_changed
        )
    if settings.webhook:
        # kopf refuses to start with admission handlers but no server: register only when served.
        kopf.on.validate(*FTJ, id="spec", operations=["CREATE", "UPDATE"], ignore_failures=True)(
            validate
        )


# --- watch caches: kopf indices, kept from the watch streams kopf has open anyway -------------
# kopf runs no other handler until every index has been filled from its first listing, so a
# status is never derived from a cache still loading (at start-up every job is looked at).
# Indices are read only in the event loop (they change there); the reconciler gets a Seen, and
# asks the loop for a new one (_look) in the rare case that it is older than the last one used.


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def training_jobs(
    body: kopf.Body, namespace: str | None, name: str | None, **_: Any
) -> dict[tuple[str, str], JobView]:
    return {(namespace or "", name or ""): JobView.from_api(body)}


@kopf.index("", "v1", "pods", labels=CHILD_LABELS)
def training_pods(
    body: kopf.Body, namespace: str | None, **_: Any
) -> dict[tuple[str, str], tuple[str, PodView]]:
    owner = body.metadata.annotations.get(LABEL_NAME)
    if not owner:
        return {}
    return {(namespace or "", owner): (body.metadata.labels[LABEL_UID], PodView.from_api(body))}


def gpu_nodes(name: str | None, labels: Mapping[str, str], **_: Any) -> dict[str, GpuNode]:
    return {name or "": GpuNode.from_labels(name or "", labels, _state["settings"].labels)}


def _keep_indices(kwargs: Mapping[str, Any]) -> None:
    """kopf hands its indices to every handler; keep them for the periodic check's task. The
    first handler also puts kopf's worker limit in force: kopf runs none before its indices are
    filled (tuning.WorkerLimit)."""
    if "indices" not in _state:
        workers = _state.get("workers")
        if isinstance(workers, tuning.WorkerLimit):
            workers.in_force = True
        _state["loop"] = asyncio.get_running_loop()
        _state["indices"] = {
            k: kwargs.get(k) for k in ("training_jobs", "training_pods", "gpu_nodes")
        }


_snapshots = itertools.count(1)


# Disrupted pods (evicted, preempted, drained), kept after their deletion until the FineTuneJob
# goes: that a pod was disrupted must not depend on a pass looking before the pod is deleted and
# replaced. Disruptions are rare; this holds a few views at most.
_disrupted: dict[tuple[str, str], dict[str, tuple[str, PodView]]] = {}


def _remember_disruption(namespace: str, owner: str, body: kopf.Body) -> None:
    view = PodView.from_api(body)
    if view.disruption is not None:
        entry = (body.metadata.labels[LABEL_UID], view)
        _disrupted.setdefault((namespace, owner), {})[view.name] = entry


def _seen(namespace: str, name: str) -> Seen:
    indices = _state["indices"]
    jobs = indices["training_jobs"].get((namespace, job_name(name)), ())
    pods = indices["training_pods"].get((namespace, name), ())
    gone = _disrupted.get((namespace, name))
    if gone:
        present = {view.name for _, view in pods}
        pods = [*pods, *(p for podname, p in gone.items() if podname not in present)]
    return Seen.collect(next(iter(jobs), None), pods, indices["gpu_nodes"], next(_snapshots))


def _look(namespace: str, name: str) -> Seen:
    """A snapshot for a pass on a worker thread: taken in the event loop, which the thread waits
    for (the loop itself never waits for a pass). It shows every change of the job's children
    so far: a change from now on needs a refresh of its own (_refresh_soon)."""
    loop: asyncio.AbstractEventLoop = _state["loop"]

    async def collect() -> Seen:
        _refresh_soon.discard((namespace, name))
        return _seen(namespace, name)

    return asyncio.run_coroutine_threadsafe(collect(), loop).result(timeout=LOOK_TIMEOUT_SECONDS)


def validate(body: kopf.Body, **kwargs: Any) -> None:
    """Admission: refuse a FineTuneJob the API model rejects, with the model's message."""
    message = webhook.admission_error(body, kwargs.get("old"))
    if message is not None:
        raise kopf.AdmissionError(message, code=422)


def _reconciler() -> Reconciler:
    reconciler: Reconciler = _state["reconciler"]
    return reconciler


def _post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(kopf.Body(cast(Any, dict(body))), type=type_, reason=reason, message=message[:1024])


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    ours: Settings = _state["settings"]
    _state["specs"] = tuning.tune(settings, None if ours.dra else ours.labels.compute_major)
    _state["workers"] = settings.queueing.worker_limit
    if ours.status_reporting:
        _keep_trainer_policy()
    if ours.webhook:
        service = None
        if ours.webhook_service and ours.webhook_namespace:
            service = webhook.ServiceRef(
                ours.webhook_service, ours.webhook_namespace, ours.webhook_port
            )
        settings.admission.server = webhook.build_endpoint(
            ours.webhook_host, ours.webhook_port, ours.webhook_cert_dir, service, ours.webhook_url
        )
        settings.admission.managed = webhook.CONFIGURATION_NAME


def _keep_trainer_policy() -> None:
    """The admission policy that keeps each trainer to its own job's progress: the operator
    does not make a shared trainer identity without it."""
    try:
        _reconciler().kube.keep_admission_policy(
            trainer_identity.build_policy(), trainer_identity.build_policy_binding()
        )
    except ApiException as exc:
        if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429):
            raise kopf.PermanentError(
                f"cannot keep the ValidatingAdmissionPolicy {trainer_identity.POLICY} "
                f"({api_message(exc)}); grant the operator create and patch on "
                "validatingadmissionpolicies and their bindings, or run it with "
                "--status-reporting=false"
            ) from exc
        raise


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@kopf.on.update(*FTJ, field="spec")
async def reconcile(body: kopf.Body, **kwargs: Any) -> None:
    _keep_indices(kwargs)
    seen = _seen(body.metadata.namespace or "", body.metadata.name or "")
    failure = await asyncio.to_thread(_reconciler().reconcile, body, seen)
    if failure is not None:  # already in the status and an Event; kopf retries only if it can help
        if failure.permanent:
            raise kopf.PermanentError(failure.describe())
        raise kopf.TemporaryError(failure.describe(), delay=RETRY_SECONDS)


# The periodic look at jobs that wait for a pod no watched object announces (status.awaits_pod):
# not every pending job, so a cluster full of queued or unschedulable jobs costs no requests. Not
# a kopf timer: kopf puts a finalizer on every object a timer runs for, and FineTuneJobs carry
# none (deleting one never waits for the operator). An event handler keeps the set of such jobs;
# one task looks at them in turn.
_awaiting_pod: dict[tuple[str, str], None] = {}


@kopf.on.event(*FTJ)
async def track_awaiting_pod(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    _keep_indices(kwargs)
    _ensure_ticker()
    key = (body.metadata.namespace or "", body.metadata.name or "")
    if event.get("type") != "DELETED" and awaits_pod(body.status):
        _awaiting_pod[key] = None
    else:
        _awaiting_pod.pop(key, None)
    if event.get("type") == "DELETED":
        _reconciler().forget(*key)
        _disrupted.pop(key, None)
        _state["specs"].forget(body.metadata.uid or "")


async def _tick_forever() -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        by_namespace: dict[str, list[tuple[str, Seen]]] = {}
        for namespace, name in list(_awaiting_pod):
            by_namespace.setdefault(namespace, []).append((name, _seen(namespace, name)))
        for namespace, waiting in by_namespace.items():
            try:
                await asyncio.to_thread(_reconciler().tick, namespace, waiting)
            except Exception:  # one namespace's trouble never stops the others' checks
                log.exception("periodic check of namespace %s failed", namespace)


def _ensure_ticker() -> None:
    """Start the periodic look from inside a handler: the task inherits the handler's context,
    which carries what kopf.event needs to post (a task started at start-up could not)."""
    if _state.get("ticker") is None:
        _state["ticker"] = asyncio.get_running_loop().create_task(_tick_forever())


@kopf.on.cleanup()
async def stop_background_tasks(**_: Any) -> None:
    ticker = _state.pop("ticker", None)
    if ticker is not None:
        ticker.cancel()
    for task in list(_refreshes):
        task.cancel()


_refresh_soon: set[tuple[str, str]] = set()
# The pending status refreshes, each a small task of its own (a strong reference keeps it alive).
_refreshes: set[asyncio.Task[None]] = set()


def _refresh_apart(namespace: str, name: str) -> None:
    """Start a job's refresh apart from the kopf worker of the child's event that asked for it:
    the worker ends at once and frees the pod or Job it holds, where it would wait for the
    refresh, behind every other pass for a thread in a burst (some 800 workers at once in a
    burst of 1,000; letting them go took about 15 MiB off the burst's RSS growth). The task holds
    two names; it inherits the handler's context, which kopf.event needs to post the status's
    Events."""
    _refresh_soon.add((namespace, name))
    task = asyncio.get_running_loop().create_task(_refresh_later(namespace, name))
    _refreshes.add(task)
    task.add_done_callback(_refresh_done)


def _refresh_done(task: asyncio.Task[None]) -> None:
    _refreshes.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("status refresh failed", exc_info=task.exception())


async def _refresh_later(namespace: str, name: str) -> None:
    """One refresh for the changes of a job's children until it looks at the caches, on its
    worker thread (_look): in a busy operator the refresh waits for a thread, and every change
    meanwhile (the Job's pod created, then found unschedulable) is served by it too, with one
    status write instead of one for each."""
    try:
        await asyncio.sleep(REFRESH_DELAY_SECONDS)
        await asyncio.to_thread(_reconciler().refresh, namespace, name)
    finally:  # a refresh that never looked (the job gone, a failed read) leaves no stale mark
        _refresh_soon.discard((namespace, name))


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "services", labels=CHILD_LABELS)
async def child_changed(
    body: kopf.Body, event: kopf.RawEvent, resource: kopf.Resource, **kwargs: Any
) -> None:
    _keep_indices(kwargs)
    owner = (body.metadata.annotations or {}).get(LABEL_NAME)
    namespace = body.metadata.namespace
    if not owner or not namespace:
        return
    # Children are level-triggered: a deleted one is made again (unless the job has finished,
    # or the operator itself deleted it to undo a refused pass).
    if event.get("type") == "DELETED" and resource.plural != "pods":
        if _reconciler().undone(body.get("kind", ""), namespace, body.metadata.name or ""):
            return
        seen = _seen(namespace, owner)
        await asyncio.to_thread(_reconciler().refresh, namespace, owner, seen, heal="deleted")
        return
    if resource.plural == "pods":
        _remember_disruption(namespace, owner, body)
    if resource.plural in ("jobs", "pods") and (namespace, owner) not in _refresh_soon:
        _refresh_apart(namespace, owner)


# A namespace's trainer identity (trainer_identity.py), shared by its jobs: a part deleted is made
# again at once while the namespace has FineTuneJobs (their pods use it), else by its next job.
@kopf.on.event("", "v1", "serviceaccounts", labels=trainer_identity.IDENTITY_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=trainer_identity.IDENTITY_LABELS)
@kopf.on.event(
    "rbac.authorization.k8s.io", "v1", "rolebindings", labels=trainer_identity.IDENTITY_LABELS
)
async def identity_changed(body: kopf.Body, event: kopf.RawEvent, **kwargs: Any) -> None:
    _keep_indices(kwargs)
    namespace = body.metadata.namespace or ""
    if event.get("type") != "DELETED" or body.metadata.name != trainer_identity.ACCOUNT:
        return
    await asyncio.to_thread(_reconciler().identity_lost, namespace)


# Kueue's Workload of a queued job (Queued, Admitted, Evicted...). Inactive where Kueue's CRDs are
# not installed: kopf serves only the resources the cluster has.
@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "workloads", labels={JOB_UID_LABEL: kopf.PRESENT})
async def workload_changed(body: kopf.Body, **kwargs: Any) -> None:
    _keep_indices(kwargs)
    namespace = body.metadata.namespace or ""
    for owner in body.metadata.get("ownerReferences") or []:
        if owner.get("kind") != "Job" or owner.get("apiVersion") != "batch/v1":
            continue
        jobs = _state["indices"]["training_jobs"].get((namespace, owner["name"]), ())
        view = next(iter(jobs), None)
        if view is not None and view.owner:  # one of ours
            seen = _seen(namespace, view.owner)
            await asyncio.to_thread(_reconciler().refresh, namespace, view.owner, seen)
