"""kopf's settings for the operator: one place, also used by the benchmark's kopf floor.

No decorators here (handlers.py has them all); `tune` is called from the start-up handler.
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast

import kopf

from finetune_api.resource import GROUP
from finetune_operator.builders import LABEL_UID
from finetune_operator.trainer_identity import IDENTITY_LABELS

# The kinds the operator makes for a FineTuneJob and watches (group, version, plural): the API
# server sends only the objects labelled as ours, so a cluster's other pods, Jobs, Services,
# ServiceAccounts and RBAC cost the operator nothing (kopf would otherwise receive them all and
# drop them on its side).
CHILD_KINDS = (
    ("batch", "v1", "jobs"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("resource.k8s.io", "v1", "resourceclaimtemplates"),
)
# The kinds of a namespace's trainer identity (trainer_identity.py), shared by its jobs.
IDENTITY_KINDS = (
    ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
)
# How long an object's worker waits for its next event before it ends (kopf's default: 5 s). A
# job's events come seconds apart; a worker kept meanwhile holds its last event's body.
WORKER_IDLE_SECONDS = 0.1
HANDLER_THREADS = 8
# Object workers running at once per watch stream (kind, namespace), once the operator is indexed
# (WorkerLimit). In a burst, kopf starts a worker for every object with an event; each one waiting
# for a thread held some 42 KB (the parsed event and kopf's processing of it), where an event
# waiting for a worker holds its parsed object alone.
WORKER_LIMIT = 32


class WorkerLimit:
    """kopf's `queueing.worker_limit`, in force only once the operator is indexed.

    kopf bounds each watch stream's running workers with it, but also during the first listing,
    where with indices every worker waits until all objects are indexed: with more objects of
    one kind than the limit the rest never start, and the operator handles nothing (seen with
    1,000 GPU nodes). kopf runs no handler before its indices are filled, so the handlers put
    the limit in force (`in_force`) when the first of them runs; before that, no limit.

    kopf's scheduler tests `running < limit`, which Python answers with this object's `__gt__`.
    (A watch stream that starts after that, for a namespace that starts to match with more of
    our Jobs or pods than the limit, would meet the same wait; a new namespace has none.)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_force = False

    def __gt__(self, running: object) -> bool:
        if not isinstance(running, int):
            return NotImplemented
        return not self.in_force or running < self.limit

    def __repr__(self) -> str:
        return f"WorkerLimit({self.limit}, in_force={self.in_force})"


class SpecMemory(kopf.DiffBaseStorage):
    """The last handled spec of each FineTuneJob, kept in the operator's memory (compact JSON by
    uid) instead of kopf's default annotation on the object, which cost a PATCH after every
    create and spec change, and the FineTuneJob event that PATCH caused.

    Only the spec: the operator acts on spec changes alone. Losing it all on a restart is
    harmless: kopf then sees every FineTuneJob as new and runs the one reconcile its create,
    update and resume handlers share, as it would have run on resume."""

    def __init__(self) -> None:
        super().__init__()
        self._specs: dict[str, str] = {}

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        # The event's own spec, not a copy: kopf only compares it and hands it to `store`, which
        # serialises it (a deep copy of every FineTuneJob event's spec was a cost of its own).
        return cast(kopf.BodyEssence, {"spec": body.get("spec") or {}})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        found = self._specs.get(body.metadata.uid or "")
        return None if found is None else cast(kopf.BodyEssence, json.loads(found))

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._specs[body.metadata.uid or ""] = json.dumps(essence, separators=(",", ":"))

    def forget(self, uid: str) -> None:
        """The FineTuneJob is gone."""
        self._specs.pop(uid, None)

    def __len__(self) -> int:
        return len(self._specs)


class RetryAnnotations(kopf.AnnotationsProgressStorage):
    """kopf's progress in annotations, written only while a handler retries. kopf also brands
    the object with a `<prefix>/kopf-managed` marker whenever it stores progress, even progress
    it purges in the same patch once the handler succeeded: a PATCH and an event for every new
    FineTuneJob. The marker now goes only with a progress record that stays."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """kopf strips its progress annotations from both sides of a diff, from deep copies.
        The diff's essences (SpecMemory's) are the spec alone: nothing to strip, nothing to
        copy (two deep copies per FineTuneJob event)."""
        return essence

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        annotations = patch.get("metadata", {}).get("annotations", {})
        marker = f"{self.prefix}/kopf-managed"
        kept = [
            k
            for k, v in annotations.items()
            if k.startswith(f"{self.prefix}/") and k != marker and v is not None
        ]
        if marker in annotations and not kept:
            del annotations[marker]
            if not annotations:
                del patch["metadata"]["annotations"]
            if not patch["metadata"]:
                del patch["metadata"]


def tune(settings: kopf.OperatorSettings, gpu_label: str | None = None) -> SpecMemory:
    """Apply the operator's kopf settings; `gpu_label` also selects the GPU nodes server-side.
    Returns the spec memory (the caller drops a deleted FineTuneJob's)."""
    # Keep kopf's retry bookkeeping in annotations under our prefix (written only while a
    # handler retries): status stays ours, and only warnings from kopf itself become Events
    # (our phase transitions post their own).
    settings.persistence.progress_storage = RetryAnnotations(prefix=GROUP)
    memory = SpecMemory()
    settings.persistence.diffbase_storage = memory
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = HANDLER_THREADS
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS
    settings.queueing.worker_limit = cast(Any, WorkerLimit(WORKER_LIMIT))
    for kind in CHILD_KINDS:
        settings.watching.label_selectors[kind] = LABEL_UID
    identity = ",".join(f"{k}={v}" for k, v in IDENTITY_LABELS.items())
    for kind in IDENTITY_KINDS:
        settings.watching.label_selectors[kind] = identity
    if gpu_label is not None:
        settings.watching.label_selectors["", "v1", "nodes"] = gpu_label
    return memory
