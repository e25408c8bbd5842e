"""hack/nodeconfig.py: the real node's configuration files, without starting anything."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import nodeconfig

ROOT = Path("/tmp/node-x")
CRI = "io.containerd.cri.v1.runtime"


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _host_paths(value: Any) -> set[str]:
    return {s for s in _strings(value) if s.startswith("/") and not s.startswith(str(ROOT))}


def test_containerd_config() -> None:
    socket = ROOT / "containerd" / "containerd.sock"
    config = tomllib.loads(nodeconfig.containerd_toml(ROOT, socket, Path("/c/runc"), True))
    assert config["version"] == 3
    assert config["grpc"]["address"] == str(socket)
    plugins = config["plugins"]
    runtime = plugins[CRI]
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"] == {"BinaryName": "/c/runc", "Root": f"{ROOT}/runc",
                               "SystemdCgroup": False}  # fmt: skip
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["cni"] == {"bin_dirs": ["/usr/lib/cni"], "conf_dir": f"{ROOT}/cni/net.d"}
    images = plugins["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == nodeconfig.PAUSE_IMAGE
    assert plugins["io.containerd.nri.v1.nri"]["disable"] is True
    assert _host_paths(config) == {"/c/runc", "/usr/lib/cni"}
    unrestricted = tomllib.loads(nodeconfig.containerd_toml(ROOT, socket, Path("/r"), False))
    assert unrestricted["plugins"][CRI]["restrict_oom_score_adj"] is False


def test_cni_network() -> None:
    network = nodeconfig.cni_network(ROOT)
    bridge, portmap = network["plugins"]
    assert (bridge["type"], bridge["bridge"], bridge["isGateway"], bridge["ipMasq"]) == (
        "bridge", nodeconfig.BRIDGE, True, True)  # fmt: skip
    assert bridge["ipam"]["ranges"] == [[{"subnet": nodeconfig.POD_CIDR}]]
    assert portmap["type"] == "portmap"
    assert _host_paths(network) == set()
    json.dumps(network)


def test_kubelet_settings() -> None:
    settings = nodeconfig.kubelet_settings(
        ROOT, ROOT / "c.sock", "192.0.2.9", crt=ROOT / "k.crt", key=ROOT / "k.key",
        ca=ROOT / "ca.crt", port=10250, healthz_port=10248,
    )  # fmt: skip
    assert settings["failCgroupV1"] is False
    assert settings["cgroupDriver"] == "cgroupfs"
    assert settings["failSwapOn"] is False
    assert settings["containerRuntimeEndpoint"] == f"unix://{ROOT}/c.sock"
    assert settings["address"] == "192.0.2.9"
    assert settings["readOnlyPort"] == 0
    assert settings["authentication"]["anonymous"] == {"enabled": False}
    assert settings["authorization"] == {"mode": "Webhook"}
    assert settings["registerWithTaints"] == [nodeconfig.GPU_TAINT]
    assert _host_paths(settings) == {"/etc/resolv.conf"}


def test_kube_proxy_settings() -> None:
    settings = nodeconfig.kube_proxy_settings(
        ROOT / "kp.kubeconfig", "n", "192.0.2.9", metrics_port=1, healthz_port=2
    )
    assert settings["mode"] == "iptables"
    assert settings["clusterCIDR"] == nodeconfig.POD_CIDR
    assert settings["nodePortAddresses"] == ["192.0.2.9/32"]
    assert settings["conntrack"]["maxPerCore"] == 0
    assert _host_paths(settings) == set()
