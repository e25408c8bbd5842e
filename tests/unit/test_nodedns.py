"""hack/nodedns.py: the real node's cluster DNS manifests and Corefile, without a cluster."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import nodeconfig
import nodedns

from localcluster import SERVICE_CIDR

MAIN_GO = Path(nodedns.__file__).parent / "coredns" / "main.go"


def _by_kind(kind: str) -> dict[str, Any]:
    (found,) = [m for m in nodedns.manifests() if m["kind"] == kind]
    return found


def test_kubelet_names_the_kube_dns_service_address() -> None:
    settings = nodeconfig.kubelet_settings(
        Path("/n"), Path("/n/c.sock"), "192.0.2.9", crt=Path("/k.crt"), key=Path("/k.key"),
        ca=Path("/ca.crt"), port=1, healthz_port=2,
    )  # fmt: skip
    assert settings["clusterDNS"] == [nodeconfig.DNS_IP] == ["10.0.0.10"]
    assert settings["clusterDomain"] == nodedns.CLUSTER_DOMAIN
    assert ipaddress.ip_address(nodeconfig.DNS_IP) in ipaddress.ip_network(SERVICE_CIDR)
    service = _by_kind("Service")
    assert service["metadata"] == {"name": "kube-dns", "namespace": "kube-system",
                                   "labels": nodedns.LABELS}  # fmt: skip
    assert service["spec"]["clusterIP"] == nodeconfig.DNS_IP
    ports = {(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]}
    assert ports == {(53, 1053, "UDP"), (53, 1053, "TCP")}


def test_deployment_runs_non_root_on_the_gpu_node_with_its_corefile() -> None:
    deployment = _by_kind("Deployment")
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    assert _by_kind("Service")["spec"]["selector"] == template["metadata"]["labels"]
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["tolerations"] == [{"key": nodeconfig.GPU_TAINT["key"], "operator": "Exists",
                                   "effect": "NoSchedule"}]  # fmt: skip
    assert pod["serviceAccountName"] == _by_kind("ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["image"] == nodeconfig.DNS_IMAGE
    assert container["imagePullPolicy"] == "Never"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p["containerPort"] for p in container["ports"]} == {nodedns.PORT}
    assert nodedns.PORT > 1024  # no NET_BIND_SERVICE for a non-root user
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == _by_kind("ConfigMap")["metadata"]["name"]
    assert container["args"] == ["-conf", "/etc/coredns/Corefile"]
    assert container["volumeMounts"][0]["mountPath"] == "/etc/coredns"
    corefile = _by_kind("ConfigMap")["data"]["Corefile"]
    assert corefile.startswith(f".:{nodedns.PORT} {{")
    assert f"health :{container['livenessProbe']['httpGet']['port']}" in corefile
    assert f"ready :{container['readinessProbe']['httpGet']['port']}" in corefile


def test_rbac_grants_what_the_kubernetes_plugin_watches() -> None:
    role = _by_kind("ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip
    for group, resource in (("", "services"), ("", "namespaces"),
                            ("discovery.k8s.io", "endpointslices")):  # fmt: skip
        assert {(group, resource, "list"), (group, resource, "watch")} <= granted
    binding = _by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "coredns",
                                    "namespace": "kube-system"}]  # fmt: skip


def test_corefile_uses_only_the_directives_our_coredns_build_has() -> None:
    """Every plugin of the Corefile is in hack/coredns/main.go's directive list (else CoreDNS
    refuses the Corefile), and `template` runs after `kubernetes` so it sees only what the
    kubernetes plugin passed on."""
    source = MAIN_GO.read_text()
    block = re.search(r"var directives = \[\]string\{(.*?)\}", source, re.DOTALL)
    assert block is not None
    order = re.findall(r'"([a-z0-9_]+)"', block.group(1))
    imported = set(re.findall(r'_ "github.com/coredns/coredns/plugin/([a-z0-9_]+)"', source))
    assert set(order) == imported
    corefile = _by_kind("ConfigMap")["data"]["Corefile"]
    used = re.findall(r"^    ([a-z0-9_]+)", corefile, re.MULTILINE)
    assert set(used) <= set(order), set(used) - set(order)
    assert order.index("kubernetes") < order.index("template")
