"""The operator's few API-server operations, on the official kubernetes client."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_api.resource import GROUP, PLURAL, VERSION
from finetune_operator import dra, kueue
from finetune_operator.dra import GpuDevice

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "finetune-operator"
# Requests return the API server's JSON as is: building the client's model classes (each one
# deep-copies the client configuration) cost more CPU than everything else the operator does.
RAW = {"_preload_content": False}


def _json(response: Any) -> Any:
    return json.loads(_drain(response))


def _drain(response: Any) -> bytes:
    """Read the whole response, which hands its connection back to the pool (a response left
    unread keeps it, and the next request pays for a new TLS handshake)."""
    data: bytes = response.data
    response.release_conn()
    return data


def _read(request: Any, *args: Any, **kwargs: Any) -> Any | None:
    """A GET's JSON, or None when the object does not exist (404); other errors raise."""
    try:
        return _json(request(*args, **kwargs, **RAW))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def load_config() -> None:
    """In-cluster credentials when running in a pod, else the local kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    # Handlers run in kopf's thread pool and create children concurrently: keep a connection
    # for each request in flight instead of opening and dropping extra ones.
    settings = client.Configuration.get_default_copy()
    settings.connection_pool_maxsize = 32
    client.Configuration.set_default(settings)
    share_configuration(settings)


def share_configuration(settings: client.Configuration) -> None:
    """Hand every object of the client the same configuration instead of a deep copy each.

    Each model object (a V1Job is some eighty of them) deep-copies the default configuration
    when built, only to read its `client_side_validation` flag; that was the largest CPU cost of
    building a job's children. The operator never changes the configuration once loaded."""
    client.Configuration.get_default_copy = classmethod(lambda _cls: settings)


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
        self.resource = client.ResourceV1Api(self.api)

    def _creator(self, obj: Any) -> Any:
        creators = {
            "V1Service": self.core.create_namespaced_service,
            "V1ServiceAccount": self.core.create_namespaced_service_account,
            "V1Role": self.rbac.create_namespaced_role,
            "V1RoleBinding": self.rbac.create_namespaced_role_binding,
            "V1Job": self.batch.create_namespaced_job,
            "V1ResourceClaimTemplate": self.resource.create_namespaced_resource_claim_template,
        }
        return creators[type(obj).__name__]

    def create_if_missing(self, obj: Any) -> bool:
        """Create a namespaced object; False when it already exists (never a second copy).
        Other refusals raise ApiException."""
        try:
            _drain(self._creator(obj)(obj.metadata.namespace, obj, **RAW))
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, obj: Any) -> None:
        """Delete a child created moments ago (rollback), its dependents in the background."""
        deleters = {
            "V1Service": self.core.delete_namespaced_service,
            "V1Job": self.batch.delete_namespaced_job,
            "V1ResourceClaimTemplate": self.resource.delete_namespaced_resource_claim_template,
        }
        try:
            _drain(
                deleters[type(obj).__name__](
                    obj.metadata.name,
                    obj.metadata.namespace,
                    propagation_policy="Background",
                    **RAW,
                )
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def keep_admission_policy(
        self,
        policy: client.V1ValidatingAdmissionPolicy,
        binding: client.V1ValidatingAdmissionPolicyBinding,
    ) -> None:
        """Server-side apply of the policy and its binding as the operator's field manager: made
        or brought up to date (an upgrade may change them) in one call each, whatever another
        replica or the API server (the policy's status) wrote meanwhile."""
        admission = client.AdmissionregistrationV1Api(self.api)
        for obj, apply in (
            (policy, admission.patch_validating_admission_policy),
            (binding, admission.patch_validating_admission_policy_binding),
        ):
            _drain(
                apply(
                    obj.metadata.name,
                    obj,
                    field_manager=FIELD_MANAGER,
                    force=True,
                    _content_type=APPLY_PATCH,
                    **RAW,
                )
            )

    def job_warnings(self, namespace: str) -> dict[str, list[tuple[str, str, str]]]:
        """Warning Events about the namespace's Jobs (e.g. FailedCreate), by Job name, oldest
        first: (time, reason, message). One request for every job the periodic check looks at."""
        events = self.core.list_namespaced_event(
            namespace, field_selector="involvedObject.kind=Job,type=Warning", **RAW
        )
        found: dict[str, list[tuple[str, str, str]]] = {}
        for event in _json(events)["items"]:
            when = (
                event.get("lastTimestamp")
                or event.get("eventTime")
                or event["metadata"].get("creationTimestamp")
            )
            job = (event.get("involvedObject") or {}).get("name") or ""
            entry = (str(when or ""), event.get("reason") or "", event.get("message") or "")
            found.setdefault(job, []).append(entry)
        return {job: sorted(entries) for job, entries in found.items()}

    def job_exists(self, namespace: str, name: str) -> bool:
        return _read(self.batch.read_namespaced_job, name, namespace) is not None

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        get = self.custom.get_namespaced_custom_object
        found: dict[str, Any] | None = _read(get, GROUP, VERSION, namespace, PLURAL, name)
        return found

    def patch_finetunejob_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        _drain(self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status},
            _content_type=MERGE_PATCH, **RAW,
        ))  # fmt: skip

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        _drain(
            self.batch.patch_namespaced_job(
                name, namespace, {"spec": {"suspend": suspend}}, _content_type=MERGE_PATCH, **RAW
            )
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

    def get_resource_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A ResourceClaim as the API server sends it (camelCase), or None when it is gone."""
        claim: dict[str, Any] | None = _read(
            self.resource.read_namespaced_resource_claim, name, namespace
        )
        return claim

    def gpu_devices(self) -> list[GpuDevice]:
        """The full GPUs in the NVIDIA DRA driver's ResourceSlices."""
        response = self.resource.list_resource_slice(
            field_selector=f"spec.driver={dra.DRIVER}", **RAW
        )
        return dra.gpus_in_slices(_json(response).get("items") or [])
