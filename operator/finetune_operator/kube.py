"""The operator's few API-server operations, on the official kubernetes client."""

from __future__ import annotations

from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_api.resource import GROUP, PLURAL, VERSION
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


class Kube:
    """Thin, typed-enough wrappers; every method is one API call (or two for create-or-get)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def create_if_missing(self, obj: Any) -> bool:
        """Create a namespaced object; False when it already exists (never a second copy)."""
        namespace = obj.metadata.namespace
        creators = {
            "V1ConfigMap": self.core.create_namespaced_config_map,
            "V1ServiceAccount": self.core.create_namespaced_service_account,
            "V1Role": self.rbac.create_namespaced_role,
            "V1RoleBinding": self.rbac.create_namespaced_role_binding,
            "V1Job": self.batch.create_namespaced_job,
        }
        try:
            creators[type(obj).__name__](namespace, obj)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

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
