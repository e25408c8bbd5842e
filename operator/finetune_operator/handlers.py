"""Every kopf decorator of the operator, and nothing else: each handler is a call or two.

`configure()` must run before kopf starts (main does it): it installs the settings and the
Reconciler the handlers use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from finetune_api.resource import GROUP, PLURAL, VERSION
from finetune_operator import webhook
from finetune_operator.builders import LABEL_NAME, LABEL_UID
from finetune_operator.kube import Kube, load_config
from finetune_operator.kueue import GROUP as KUEUE_GROUP
from finetune_operator.kueue import JOB_UID_LABEL
from finetune_operator.kueue import VERSION as KUEUE_VERSION
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings

FTJ = (GROUP, VERSION, PLURAL)
log = logging.getLogger(__name__)
CHILD_LABELS: dict[str, Any] = {LABEL_UID: kopf.PRESENT}
RETRY_SECONDS = 60  # a child refused for a reason that may pass (quota, RBAC, a webhook down)
TICK_SECONDS = 30  # how often a job that has not started is looked at (FailedCreate, lost Job)


def not_started(status: Mapping[str, Any]) -> bool:
    return status.get("phase") in (None, "Pending", "Queued", "Admitted")


_state: dict[str, Any] = {}


def configure(settings: Settings) -> None:
    load_config()
    _state["settings"] = settings
    _state["reconciler"] = Reconciler(settings, Kube(), _post_event)
    if settings.webhook:
        # kopf refuses to start with admission handlers but no server: register only when served.
        kopf.on.validate(*FTJ, id="spec", operations=["CREATE", "UPDATE"], ignore_failures=True)(
            validate
        )


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
    # Keep kopf's bookkeeping in annotations under our prefix: status stays ours, and only
    # warnings from kopf itself become Events (our phase transitions post their own).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    ours: Settings = _state["settings"]
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


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@kopf.on.update(*FTJ, field="spec")
def reconcile(body: kopf.Body, **_: Any) -> None:
    failure = _reconciler().reconcile(body)
    if failure is not None:  # already in the status and an Event; kopf retries only if it can help
        if failure.permanent:
            raise kopf.PermanentError(failure.describe())
        raise kopf.TemporaryError(failure.describe(), delay=RETRY_SECONDS)


# The periodic look at jobs that have not started. Not a kopf timer: kopf puts a finalizer on
# every object a timer runs for, and FineTuneJobs carry none (deleting one never waits for the
# operator). An event handler keeps the set of such jobs; one task looks at them in turn.
_not_started: dict[tuple[str, str], None] = {}


@kopf.on.event(*FTJ)
def track_not_started(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    key = (body.metadata.namespace or "", body.metadata.name or "")
    if event.get("type") != "DELETED" and not_started(body.status):
        _not_started[key] = None
    else:
        _not_started.pop(key, None)


async def _tick_forever() -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        for namespace, name in list(_not_started):
            try:
                await asyncio.to_thread(_reconciler().tick, namespace, name)
            except Exception:  # one job's trouble never stops the others' checks
                log.exception("periodic check of %s/%s failed", namespace, name)


@kopf.on.startup()
async def start_ticker(memo: kopf.Memo, **_: Any) -> None:
    memo["ticker"] = asyncio.create_task(_tick_forever())


@kopf.on.cleanup()
async def stop_ticker(memo: kopf.Memo, **_: Any) -> None:
    ticker = memo.get("ticker")
    if ticker is not None:
        ticker.cancel()


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "configmaps", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "serviceaccounts", labels=CHILD_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_LABELS)
def child_changed(body: kopf.Body, event: kopf.RawEvent, resource: kopf.Resource, **_: Any) -> None:
    owner = (body.metadata.annotations or {}).get(LABEL_NAME)
    if not owner or not body.metadata.namespace:
        return
    # Children are level-triggered: a deleted one is made again (unless the job has finished).
    deleted = event.get("type") == "DELETED" and resource.plural != "pods"
    if deleted or resource.plural in ("jobs", "pods"):
        _reconciler().refresh(body.metadata.namespace, owner, heal="deleted" if deleted else False)


# Kueue's Workload of a queued job (Queued, Admitted, Evicted...). Inactive where Kueue's CRDs are
# not installed: kopf serves only the resources the cluster has.
@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "workloads", labels={JOB_UID_LABEL: kopf.PRESENT})
def workload_changed(body: kopf.Body, **_: Any) -> None:
    namespace = body.metadata.namespace
    for owner in body.metadata.get("ownerReferences") or []:
        if owner.get("kind") == "Job" and owner.get("apiVersion") == "batch/v1" and namespace:
            _reconciler().refresh_job(namespace, owner["name"])
