"""The real node's cluster DNS (hack/realnode.py): CoreDNS as a Deployment in kube-system behind
the `kube-dns` Service, as kubeadm and most distributions run it.

CoreDNS is built from its Go module (hack/coredns, only the plugins used here) and imported as
an image like the pause image. It runs as a non-root user listening on 1053 (the Service maps
port 53 to it), with a ServiceAccount allowed to list and watch what the `kubernetes` plugin
reads. The kubelet's `clusterDNS` names the Service's fixed ClusterIP (DNS_IP); pods reach it
through kube-proxy. Names outside the cluster's zones get NXDOMAIN at once: there is no upstream.

`manifests()` is a pure function of the image name; `install()`, `wait_available()` and
`uninstall()` talk to the API server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from nodeconfig import DNS_IMAGE, DNS_IP, GPU_TAINT

NAMESPACE = "kube-system"
NAME = "coredns"
SERVICE = "kube-dns"  # the name kubeadm gives it; some tools look it up
PORT = 1053  # above 1024: no NET_BIND_SERVICE needed
HEALTH_PORT = 8080
READY_PORT = 8181
CLUSTER_DOMAIN = "cluster.local"
LABELS = {"k8s-app": "kube-dns"}
# The `template` plugin runs after `kubernetes` (the order hack/coredns/main.go gives
# dnsserver.Directives), so it sees only names the `kubernetes` plugin passed on.
COREFILE = f""".:{PORT} {{
    errors
    health :{HEALTH_PORT}
    ready :{READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        ttl 30
    }}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
    cache 30
    loadbalance
}}
"""


def manifests(image: str = DNS_IMAGE) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole and its binding, the Corefile, the Deployment, the Service."""
    meta = {"name": NAME, "namespace": NAMESPACE, "labels": LABELS}
    rules = [
        {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["list", "watch"]},
    ]  # fmt: skip
    probe = {"periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 3}
    container = {
        "name": "coredns", "image": image, "imagePullPolicy": "Never",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [{"name": "dns", "containerPort": PORT, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"},
                      "limits": {"memory": "128Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": READY_PORT}, **probe},
        "livenessProbe": {"httpGet": {"path": "/health", "port": HEALTH_PORT},
                          "initialDelaySeconds": 10, **probe},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
    }  # fmt: skip
    pod_spec = {
        "serviceAccountName": NAME,
        "dnsPolicy": "Default",  # the node's resolv.conf, not itself
        "priorityClassName": "system-cluster-critical",
        "tolerations": [{"key": GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": NAME}}],
    }  # fmt: skip
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": f"system:{NAME}", "labels": LABELS}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"system:{NAME}", "labels": LABELS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": f"system:{NAME}"},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": LABELS},
                  "template": {"metadata": {"labels": LABELS}, "spec": pod_spec}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": SERVICE, "namespace": NAMESPACE, "labels": LABELS},
         "spec": {"clusterIP": DNS_IP, "selector": LABELS,
                  "ports": [{"name": "dns", "port": 53, "targetPort": PORT, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": PORT,
                             "protocol": "TCP"}]}},
    ]  # fmt: skip


def _calls(api: client.ApiClient, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(create, delete) for one kind; namespaced ones take the namespace as second argument."""
    core, apps, rbac = (
        client.CoreV1Api(api),
        client.AppsV1Api(api),
        client.RbacAuthorizationV1Api(api),
    )
    return {
        "ServiceAccount": (core.create_namespaced_service_account,
                           core.delete_namespaced_service_account),
        "ClusterRole": (rbac.create_cluster_role, rbac.delete_cluster_role),
        "ClusterRoleBinding": (rbac.create_cluster_role_binding,
                               rbac.delete_cluster_role_binding),
        "ConfigMap": (core.create_namespaced_config_map, core.delete_namespaced_config_map),
        "Deployment": (apps.create_namespaced_deployment, apps.delete_namespaced_deployment),
        "Service": (core.create_namespaced_service, core.delete_namespaced_service),
    }[kind]  # fmt: skip


def install(api: client.ApiClient) -> None:
    """Create every object; one that exists already (a node started again) is kept."""
    for body in manifests():
        create, _ = _calls(api, body["kind"])
        args = (body["metadata"]["namespace"],) if "namespace" in body["metadata"] else ()
        try:
            create(*args, body)
        except client.ApiException as err:
            if err.status != 409:
                raise


def uninstall(api: client.ApiClient) -> None:
    """Delete every object, the Deployment first (its pods go with it, in the foreground)."""
    for body in reversed(manifests()):
        _, delete = _calls(api, body["kind"])
        meta = body["metadata"]
        args = (meta["name"], meta["namespace"]) if "namespace" in meta else (meta["name"],)
        with contextlib.suppress(client.ApiException):
            delete(*args, propagation_policy="Foreground", grace_period_seconds=1)


def wait_available(api: client.ApiClient, timeout: float = 90.0) -> None:
    """Wait until the Deployment reports Available and the Service has a ready endpoint."""
    apps, discovery = client.AppsV1Api(api), client.DiscoveryV1Api(api)
    deadline = time.monotonic() + timeout
    last = "no status"
    while time.monotonic() < deadline:
        deployment = apps.read_namespaced_deployment(NAME, NAMESPACE)
        conditions = {c.type: c for c in deployment.status.conditions or []}
        available = conditions.get("Available")
        last = f"Available={available.status}: {available.message}" if available else last
        slices = discovery.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={SERVICE}"
        ).items
        ready = [e for s in slices for e in s.endpoints or [] if e.conditions.ready]
        if available is not None and available.status == "True" and ready:
            return
        time.sleep(1)
    raise TimeoutError(f"CoreDNS not available after {timeout:.0f}s ({last})")
