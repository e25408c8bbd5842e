"""kopf's settings for the operator: one place, also used by the benchmark's kopf floor.

No decorators here (handlers.py has them all); `tune` is called from the start-up handler.
"""

from __future__ import annotations

import logging

import kopf

from finetune_api.resource import GROUP
from finetune_operator.builders import LABEL_UID

# The kinds the operator makes for a FineTuneJob and watches (group, version, plural): the API
# server sends only the objects labelled as ours, so a cluster's other pods, Jobs, ConfigMaps,
# ServiceAccounts and RBAC cost the operator nothing (kopf would otherwise receive them all and
# drop them on its side).
CHILD_KINDS = (
    ("batch", "v1", "jobs"),
    ("", "v1", "pods"),
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("resource.k8s.io", "v1", "resourceclaimtemplates"),
)
# How long an object's worker waits for its next event before it ends (kopf's default: 5 s). A
# job's events come seconds apart; a worker kept meanwhile holds its last event's body.
# (kopf's `queueing.worker_limit` must stay unset: with indices, each worker of the first listing
# waits until every object is indexed, so more objects than the limit never start: a deadlock
# seen with 1,000 nodes.)
WORKER_IDLE_SECONDS = 0.1
HANDLER_THREADS = 8


def tune(settings: kopf.OperatorSettings, gpu_label: str | None = None) -> None:
    """Apply the operator's kopf settings; `gpu_label` also selects the GPU nodes server-side."""
    # Keep kopf's bookkeeping in annotations under our prefix: status stays ours, and only
    # warnings from kopf itself become Events (our phase transitions post their own).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = HANDLER_THREADS
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS
    for kind in CHILD_KINDS:
        settings.watching.label_selectors[kind] = LABEL_UID
    if gpu_label is not None:
        settings.watching.label_selectors["", "v1", "nodes"] = gpu_label
