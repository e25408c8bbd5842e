"""The operator's few API-server operations, on the official kubernetes client."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_api.resource import GROUP, PLURAL, VERSION
from finetune_operator import kueue
from finetune_operator.builders import LABEL_UID
from finetune_operator.placement import GpuNode
from finetune_operator.settings import GpuLabels

MERGE_PATCH = "application/merge-patch+json"


def load_config() -> None:
    """In-cluster credentials when running in a pod, else the local kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def api_message(exc: ApiException) -> str:
    """The API server's own message for a failed request (its Status), on one line."""
    message = ""
    try:
        body = json.loads(exc.body or "")
        message = body.get("message", "") if isinstance(body, dict) else ""
    except ValueError:
        pass
    return " ".join((message or exc.reason or f"HTTP {exc.status}").split())


class Kube:
    """Thin, typed-enough wrappers; every method is one API call (or two for create-or-get)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _creator(self, obj: Any) -> Any:
        creators = {
            "V1ConfigMap": self.core.create_namespaced_config_map,
            "V1ServiceAccount": self.core.create_namespaced_service_account,
            "V1Role": self.rbac.create_namespaced_role,
            "V1RoleBinding": self.rbac.create_namespaced_role_binding,
            "V1Job": self.batch.create_namespaced_job,
        }
        return creators[type(obj).__name__]

    def create_if_missing(self, obj: Any, *, dry_run: bool = False) -> bool:
        """Create a namespaced object (or only check that the API server would, with `dry_run`);
        False when it already exists (never a second copy). Other refusals raise ApiException."""
        kwargs = {"dry_run": "All"} if dry_run else {}
        try:
            self._creator(obj)(obj.metadata.namespace, obj, **kwargs)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, obj: Any) -> None:
        """Delete a child created moments ago (rollback), its dependents in the background."""
        deleters = {
            "V1ConfigMap": self.core.delete_namespaced_config_map,
            "V1ServiceAccount": self.core.delete_namespaced_service_account,
            "V1Role": self.rbac.delete_namespaced_role,
            "V1RoleBinding": self.rbac.delete_namespaced_role_binding,
            "V1Job": self.batch.delete_namespaced_job,
        }
        try:
            deleters[type(obj).__name__](
                obj.metadata.name, obj.metadata.namespace, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def job_events(self, namespace: str, job: str) -> list[tuple[str, str, str]]:
        """Warning Events about a Job (e.g. FailedCreate), oldest first: (time, reason, message)."""
        events = self.core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind=Job,involvedObject.name={job},type=Warning",
        )
        found = []
        for event in events.items:
            when = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
            found.append((str(when or ""), event.reason or "", event.message or ""))
        return sorted(found)

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def patch_finetunejob_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _content_type=MERGE_PATCH
        )

    def get_job(self, namespace: str, name: str) -> Any | None:
        try:
            return self.batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.batch.patch_namespaced_job(
            name, namespace, {"spec": {"suspend": suspend}}, _content_type=MERGE_PATCH
        )

    def get_workload(self, namespace: str, job_uid: str) -> dict[str, Any] | None:
        """Kueue's Workload for the Job with this uid (None without one, or without Kueue)."""
        try:
            found = self.custom.list_namespaced_custom_object(
                kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                label_selector=f"{kueue.JOB_UID_LABEL}={job_uid}",
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:  # Kueue's CRDs are not installed
                return None
            raise
        items: list[dict[str, Any]] = found.get("items") or []
        return items[0] if items else None

    def set_workload_active(self, namespace: str, name: str, active: bool) -> None:
        self.custom.patch_namespaced_custom_object(
            kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS, name,
            {"spec": {"active": active}}, _content_type=MERGE_PATCH,
        )  # fmt: skip

    def list_pods(self, namespace: str, uid: str) -> list[Any]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_UID}={uid}")
        return list(pods.items)

    def gpu_node(self, name: str, labels: GpuLabels) -> GpuNode | None:
        try:
            node = self.core.read_node(name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return GpuNode.from_labels(name, node.metadata.labels or {}, labels)

    def gpu_nodes(self, labels: GpuLabels) -> list[GpuNode]:
        """Nodes carrying a compute-capability label."""
        nodes = self.core.list_node(label_selector=labels.compute_major)
        return [
            GpuNode.from_labels(n.metadata.name, n.metadata.labels or {}, labels)
            for n in nodes.items
        ]
