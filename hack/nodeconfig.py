"""The real node's configuration files (hack/realnode.py), as pure functions of their inputs:
containerd's TOML, the CNI network, the KubeletConfiguration and the KubeProxyConfiguration.
Every path they name lives under the node's directory except the CNI plugin binaries and the
host's resolv.conf."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from localcluster import SERVICE_CIDR

PAUSE_IMAGE = "localhost/finetune-node/pause:local"
PROBE_IMAGE = "localhost/finetune-node/kubeprobe:local"
DNS_IMAGE = "localhost/finetune-node/coredns:local"
# The cluster DNS Service's ClusterIP: the tenth address of the service CIDR, as kubeadm picks it.
DNS_IP = str(ipaddress.ip_network(SERVICE_CIDR)[10])
NETWORK = "finetune-node"  # the CNI network's name: its iptables rules carry it in a comment
BRIDGE = "ftnode0"
POD_CIDR = "10.244.0.0/24"
CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def cni_network(root: Path) -> dict[str, Any]:
    """A bridge with the pods' gateway on it, masquerade for traffic leaving the pod CIDR,
    host-local addresses (state under `root`) and hostPort mappings."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(root / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }  # fmt: skip


def containerd_toml(root: Path, socket: Path, runc: Path, restrict_oom_score_adj: bool) -> str:
    """containerd's config, version 3 (containerd 2.0-2.3's; 2.4 migrates it to 4 in memory,
    with a warning). 2.4 also reads drop-ins from /etc/containerd/conf.d (`imports = []` does
    not stop it); there are none on the machines this runs on."""
    base = root / "containerd"
    cri = "plugins.'io.containerd.cri.v1.runtime'"
    runc_table = f"{cri}.containerd.runtimes.runc"
    return f"""version = 3
root = '{base}/root'
state = '{base}/state'

[grpc]
  address = '{socket}'
[ttrpc]
  address = '{socket}.ttrpc'

[plugins.'io.containerd.internal.v1.opt']
  path = '{base}/opt'
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'
[{cri}]
  restrict_oom_score_adj = {str(restrict_oom_score_adj).lower()}
  # Pod network namespaces under the state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    default_runtime_name = 'runc'
  [{runc_table}]
    runtime_type = 'io.containerd.runc.v2'
  [{runc_table}.options]
    BinaryName = '{runc}'
    Root = '{root}/runc'
    SystemdCgroup = false
  [{cri}.cni]
    bin_dirs = ['{CNI_BIN}']
    conf_dir = '{root}/cni/net.d'
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"""


def kubelet_settings(
    root: Path, socket: Path, ip: str, *, crt: Path, key: Path, ca: Path, port: int,
    healthz_port: int,
) -> dict[str, Any]:  # fmt: skip
    """The KubeletConfiguration: serving on the node's InternalIP with a certificate from the
    cluster CA, x509 and webhook authentication, webhook authorization."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Kubernetes 1.35+ refuses to start on cgroup v1 unless told; this machine has v1 only.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",  # no systemd here; containerd's runc uses cgroupfs too
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{socket}",
        "address": ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(crt),
        "tlsPrivateKeyFile": str(key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "registerWithTaints": [GPU_TAINT],
        "podLogsDir": str(root / "pod-logs"),
        "resolvConf": "/etc/resolv.conf",
        "clusterDomain": "cluster.local",
        "clusterDNS": [DNS_IP],  # CoreDNS behind the kube-dns Service (hack/nodedns.py)
        # The machine's disk is shared and fairly full: evict only when nearly out of room.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
    }  # fmt: skip


def kube_proxy_settings(
    kubeconfig: Path, name: str, ip: str, *, metrics_port: int, healthz_port: int
) -> dict[str, Any]:
    """The KubeProxyConfiguration: iptables mode, NodePorts on the node's address only (localhost
    NodePorts would need the route_localnet sysctl), conntrack sysctls left alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": name,
        "clusterCIDR": POD_CIDR,
        "detectLocalMode": "ClusterCIDR",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "nodePortAddresses": [f"{ip}/32"],
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
    }  # fmt: skip
