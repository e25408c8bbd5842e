"""A real Kubernetes node on this machine, beside the local control plane (hack/localcluster.py).

containerd 2.x (config v3, cgroupfs, runc built from its Go module), a CNI bridge (10.244.0.0/24, masquerade),
the kubelet (cgroup v1 allowed: `failCgroupV1: false`), kube-proxy (iptables mode), and a device
plugin that advertises `nvidia.com/gpu`; the node carries GPU Feature Discovery's labels of one
GPU model (hack/gpusim.py) and its taint, and CoreDNS as the cluster DNS (hack/nodedns.py: a
Deployment behind the kube-dns Service that the kubelet's clusterDNS names). The pause image, the
test image and CoreDNS's are built here (hack/nodeimages, hack/coredns, hack/ociimage.py) and
imported with `ctr`; nothing is pulled. Needs root.
Everything lives under a directory of the caller's choice; `stop()` removes every process,
mount, iptables chain, the bridge and the sysctls it changed.

The control plane must run with `node_address` (`localcluster.py up --node-address IP`).

    python hack/realnode.py up [CLUSTER_DIR] [NODE_DIR]    # default .cluster and .cluster-node
    python hack/realnode.py down [CLUSTER_DIR] [NODE_DIR]
    python hack/realnode.py import ARCHIVE [CLUSTER_DIR] [NODE_DIR]   # an OCI/docker archive

`make node-up` starts both (the control plane on this machine's address), `make node-down` stops
both. Images reach the node only by `import` (`ctr -n k8s.io images import`): pods use
`imagePullPolicy: IfNotPresent` or `Never`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import nodeclean
import nodeconfig
import nodedns
from kubernetes import client, config
from nodeconfig import BRIDGE, DNS_IMAGE, NETWORK, PAUSE_IMAGE, PROBE_IMAGE
from ociimage import ImageFile, write_image

from gpusim import GPU_TYPES, gfd_labels
from localcluster import DEFAULT_DIR, HACK, ClusterError, LocalCluster, free_port, issue_certificate

DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")  # the kubelet's, whatever --root-dir
# Host paths the node writes to whatever its settings: the kubelet's device-plugin directory, its
# links to container logs, containerd's shim sockets. Removed at stop when the node made them.
HOST_DIRS = ("/var/lib/kubelet", "/var/log/containers", "/run/containerd")
# One real node per machine: the kubepods cgroups, the device-plugin directory and kube-proxy's
# chains are machine-wide. The file names the node directory that owns the machine.
OWNER = Path("/run/finetune-realnode.owner")
SERIALIZE = client.ApiClient().sanitize_for_serialization
SYSCTLS = ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables")


def default_address() -> str:
    """The address this machine reaches the outside from (eth0's): the route lookup of a UDP
    socket's connect sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.254", 9))
        return str(sock.getsockname()[0])


def can_lower_oom_score_adj() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE. Without it (this Firecracker VM's root) runc
    cannot give a sandbox the kubelet's negative oom_score_adj ("failed to update
    /proc/self/oom_score_adj: Permission denied"), so containerd must keep the containers' at or
    above its own (`restrict_oom_score_adj`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def find_node_binaries() -> tuple[Path, Path, Path, Path, Path]:
    """(Kubernetes cache, containerd cache, runc cache, node-helper cache, CoreDNS cache), built
    once by node-binaries.sh."""
    result = subprocess.run(
        ["bash", str(HACK / "node-binaries.sh")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ClusterError(f"cannot provide the node's binaries: {result.stderr.strip()}")
    kube, containerd, runc, helpers, dns = result.stdout.strip().splitlines()[-5:]
    return Path(kube), Path(containerd), Path(runc), Path(helpers), Path(dns)


@dataclass
class RealNode:
    """One real node named `name` whose state lives under `root`."""

    cluster: LocalCluster
    root: Path
    name: str = "realnode-a100"
    gpu: str = "a100"
    gpus: int = 1
    ip: str = ""
    runc: Path | None = None  # default: the runc node-binaries.sh builds
    _pids: dict[str, int] = field(default_factory=dict)
    _argv: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        if not self.ip:
            host = urlsplit(self.cluster.server).hostname or ""
            if host.startswith("127."):
                raise ClusterError(
                    "the control plane listens on loopback, which pods cannot reach: start it "
                    "with node_address (localcluster.py up --node-address IP)"
                )
            self.ip = host

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()

    # -- start ---------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> RealNode:
        """Start the node and wait until it is Ready with its GPUs; undo everything on failure."""
        if os.geteuid() != 0:
            raise ClusterError("a real node needs root (containerd, runc, iptables, mounts)")
        if (self.root / "state.json").exists():
            raise ClusterError(f"a node already runs from {self.root}; run 'down' first")
        self._claim_machine()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        kube, ctrd, runc, helpers, dns = find_node_binaries()
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._save_state(kube=str(kube), containerd=str(ctrd),
                         host_dirs={d: Path(d).exists() for d in HOST_DIRS}, sysctls=nodeclean.read_sysctls(SYSCTLS),
                         netns=sorted(nodeclean.netns_names()),
                         chains=nodeclean.chains())  # fmt: skip
        nodeclean.write_sysctls(dict.fromkeys(SYSCTLS, "1"))
        self._write_cni()
        self._start_containerd(ctrd, self.runc or runc / "runc")
        self._import_images(ctrd, helpers, dns)
        self._start_kubelet(kube)
        self._spawn("gpu-device-plugin", [
            str(helpers / "gpu-device-plugin"), "-dir", str(DEVICE_PLUGINS),
            "-resource", "nvidia.com/gpu", "-count", str(self.gpus),
        ])  # fmt: skip
        self._start_kube_proxy(kube)
        self._wait_ready(timeout)
        self._start_dns()

    def _start_dns(self) -> None:
        """CoreDNS as the cluster's DNS (hack/nodedns.py): a Deployment behind the kube-dns
        Service at the kubelet's clusterDNS address."""
        api = config.new_client_from_config(str(self.cluster.kubeconfig))
        self._save_state(dns=True)
        nodedns.install(api)
        try:
            nodedns.wait_available(api)
        except TimeoutError as err:
            pods = (
                self.api()
                .list_namespaced_pod(nodedns.NAMESPACE, label_selector="k8s-app=kube-dns")
                .items
            )
            statuses = [SERIALIZE(p.status.container_statuses) for p in pods]
            raise ClusterError(f"{err}; its pods' container statuses: {statuses}") from None

    def _claim_machine(self) -> None:
        try:
            fd = os.open(OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            other = Path(OWNER.read_text().strip())
            if (other / "state.json").exists():
                raise ClusterError(
                    f"a real node already runs on this machine from {other} (the kubelet's "
                    f"cgroups and kube-proxy's chains are machine-wide); stop it first"
                ) from None
            OWNER.unlink(missing_ok=True)  # its owner is gone without stopping
            fd = os.open(OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as owner:
            owner.write(f"{self.root}\n")
        self.root.mkdir(parents=True, exist_ok=True)
        self._save_state(owner=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self._pids[name] = proc.pid
        self._argv[name] = argv
        self._save_state(pids=self._pids)

    def restart(self, name: str) -> None:
        """Stop one of the node's processes (SIGTERM) and start it again with the same
        arguments, as a service manager restarts a kubelet."""
        nodeclean.terminate(self._pids[name])
        self._spawn(name, self._argv[name])

    def _save_state(self, **values: object) -> None:
        path = self.root / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        state.update(values)
        path.write_text(json.dumps(state, indent=1))

    def _write_cni(self) -> None:
        conf = self.root / "cni" / "net.d"
        conf.mkdir(parents=True, exist_ok=True)
        network = nodeconfig.cni_network(self.root)
        (conf / "10-finetune-node.conflist").write_text(json.dumps(network, indent=1))

    def _start_containerd(self, ctrd: Path, runc: Path) -> None:
        base = self.root / "containerd"
        base.mkdir(parents=True, exist_ok=True)
        restrict = not can_lower_oom_score_adj()
        toml = nodeconfig.containerd_toml(self.root, self.containerd_socket, runc, restrict)
        (base / "config.toml").write_text(toml)
        self._spawn("containerd", [str(ctrd / "containerd"), "--config", str(base / "config.toml")])
        env = {**os.environ, "PATH": f"{ctrd}:{os.environ.get('PATH', '')}"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._check_alive()
            probe = self._ctr(ctrd, "version", check=False, env=env)
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise ClusterError(f"containerd did not answer; see {self.root}/logs/containerd.log")

    def ctr(self, *args: str) -> str:
        """Run `ctr` against the node's containerd in the kubelet's namespace (k8s.io)."""
        state = json.loads((self.root / "state.json").read_text())
        return self._ctr(Path(state["containerd"]), *args).stdout

    def _ctr(
        self, ctrd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(ctrd / "ctr"), "--address", str(self.containerd_socket), "-n", "k8s.io", *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return result

    def import_image(self, archive: Path) -> str:
        """Import an image archive (OCI layout or `docker save` tar) into the kubelet's
        containerd namespace; returns ctr's report."""
        return self.ctr("images", "import", str(archive))

    def kill_container(self, container_id: str) -> None:
        """SIGKILL to every process in a container (`containerd://ID` as a pod's status gives
        it), at once, as the OOM killer or a dying node ends one; the kubelet reports exit 137."""
        task = container_id.removeprefix("containerd://")
        self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task)

    def _import_images(self, ctrd: Path, helpers: Path, dns: Path) -> None:
        images = self.root / "images"
        images.mkdir(exist_ok=True)
        for name, source, binary, user in (
            (PAUSE_IMAGE, helpers, "pause", "65535:65535"),
            (PROBE_IMAGE, helpers, "kubeprobe", "65534:65534"),
            (DNS_IMAGE, dns, "coredns", "65532:65532"),
        ):
            archive = images / f"{binary}.tar"
            write_image(archive, name, [ImageFile(f"/{binary}", source / binary)],
                        [f"/{binary}"], user)  # fmt: skip
            self._ctr(ctrd, "images", "import", "--local", str(archive))

    def _start_kubelet(self, kube: Path) -> None:
        pki = self.cluster.root / "pki"
        kubeconfig = self.cluster.client_kubeconfig(
            f"kubelet-{self.name}", f"system:node:{self.name}", ("system:nodes",)
        )
        crt, key = issue_certificate(
            pki, f"kubelet-serving-{self.name}", f"/O=system:nodes/CN=system:node:{self.name}",
            ip_sans=(self.ip,), client=False,
        )  # fmt: skip
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        settings = nodeconfig.kubelet_settings(
            self.root, self.containerd_socket, self.ip, crt=crt, key=key, ca=pki / "ca.crt",
            port=free_port(), healthz_port=free_port(),
        )  # fmt: skip
        (self.kubelet_dir / "config.json").write_text(json.dumps(settings, indent=1))
        labels = {"kubernetes.io/os": "linux", **gfd_labels(GPU_TYPES[self.gpu], self.gpus)}
        self._spawn("kubelet", [
            str(kube / "kubelet"), "--config", str(self.kubelet_dir / "config.json"),
            "--kubeconfig", str(kubeconfig), "--root-dir", str(self.kubelet_dir),
            "--hostname-override", self.name, "--node-ip", self.ip,
            "--node-labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
            "--v=2",
        ])  # fmt: skip

    def _start_kube_proxy(self, kube: Path) -> None:
        kubeconfig = self.cluster.client_kubeconfig(f"kube-proxy-{self.name}", "system:kube-proxy")
        settings = nodeconfig.kube_proxy_settings(
            kubeconfig, self.name, self.ip, metrics_port=free_port(), healthz_port=free_port()
        )
        path = self.root / "kube-proxy.json"
        path.write_text(json.dumps(settings, indent=1))
        self._spawn("kube-proxy", [str(kube / "kube-proxy"), "--config", str(path), "--v=2"])

    def api(self) -> client.CoreV1Api:
        return client.CoreV1Api(config.new_client_from_config(str(self.cluster.kubeconfig)))

    def _wait_ready(self, timeout: float) -> None:
        core = self.api()
        deadline = time.monotonic() + timeout
        last = "not registered"
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(client.ApiException):
                node = core.read_node(self.name)
                ready = any(c.type == "Ready" and c.status == "True"
                            for c in node.status.conditions or [])  # fmt: skip
                gpus = (node.status.allocatable or {}).get("nvidia.com/gpu", "0")
                taints = {t.key for t in node.spec.taints or []}
                last = f"ready={ready} nvidia.com/gpu={gpus} taints={sorted(taints)}"
                if (
                    ready
                    and gpus == str(self.gpus)
                    and "node.kubernetes.io/not-ready" not in taints
                ):
                    return
            time.sleep(1)
        plugin = (self.root / "logs" / "gpu-device-plugin.log").read_text().splitlines()[-6:]
        raise ClusterError(
            f"node {self.name} not ready after {timeout:.0f}s ({last}); the device plugin's log "
            f"ends with: {' | '.join(plugin)}"
        )

    def _check_alive(self) -> None:
        for name, pid in self._pids.items():
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    tail = (self.root / "logs" / f"{name}.log").read_text()[-3000:]
                    raise ClusterError(f"{name} exited during start-up:\n{tail}")

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Delete the node's pods, stop every process, and undo what start() did to the host."""
        path = self.root / "state.json"
        if not path.exists():
            return
        state = json.loads(path.read_text())
        pids: dict[str, int] = state.get("pids", {})
        if state.get("dns"):
            # Before the drain: the Deployment would put its pod back on the draining node.
            with contextlib.suppress(Exception):
                nodedns.uninstall(config.new_client_from_config(str(self.cluster.kubeconfig)))
        if "kubelet" in pids:
            with contextlib.suppress(Exception):
                self._drain(self.api())
        for name in ("kube-proxy", "gpu-device-plugin", "kubelet"):
            if name in pids:
                nodeclean.terminate(pids[name])
        if "kube-proxy" in pids:
            # Removes the KUBE-* chains of its iptables mode.
            subprocess.run([str(Path(state["kube"]) / "kube-proxy"), "--cleanup"],
                           capture_output=True, check=False)  # fmt: skip
        if "containerd" in pids:
            ctrd = Path(state["containerd"])
            for task in self._ctr(ctrd, "tasks", "ls", "-q", check=False).stdout.split():
                self._ctr(ctrd, "tasks", "kill", "-s", "SIGKILL", task, check=False)
            nodeclean.terminate(pids["containerd"])
        nodeclean.kill_shims(str(self.containerd_socket))
        nodeclean.remove_kubepods_cgroups()
        nodeclean.unmount_under(self.root)
        nodeclean.remove_netns(set(nodeclean.netns_names()) - set(state.get("netns", [])))
        nodeclean.remove_chains(state.get("chains", {}), NETWORK)
        nodeclean.remove_link(BRIDGE)
        nodeclean.remove_pod_log_links(self.root)
        nodeclean.write_sysctls(state.get("sysctls", {}))
        nodeclean.remove_device_plugin_files(DEVICE_PLUGINS)
        nodeclean.remove_created_dirs(state.get("host_dirs", {}))
        with contextlib.suppress(client.ApiException, Exception):
            self.api().delete_node(self.name)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)
        if state.get("owner") and OWNER.exists() and OWNER.read_text().strip() == str(self.root):
            OWNER.unlink()

    def _drain(self, core: client.CoreV1Api) -> None:
        """Delete the node's pods gracefully and wait (30 s at most) until the kubelet has stopped
        them, so their sandboxes' networks are torn down through CNI."""
        selector = f"spec.nodeName={self.name}"
        for pod in core.list_pod_for_all_namespaces(field_selector=selector).items:
            with contextlib.suppress(client.ApiException):
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                           grace_period_seconds=1)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not core.list_pod_for_all_namespaces(field_selector=selector).items:
                return
            time.sleep(0.5)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "down", "import") or argv == ["import"]:
        print(__doc__, file=sys.stderr)
        return 2
    archive = None
    if argv[0] == "import":
        archive = Path(argv.pop(1)).resolve()
    cluster = LocalCluster(Path(argv[1]).resolve() if len(argv) > 1 else DEFAULT_DIR)
    root = Path(argv[2]) if len(argv) > 2 else cluster.root.parent / ".cluster-node"
    node = RealNode(cluster, root)
    if archive is not None:
        print(node.import_image(archive), end="")
    elif argv[0] == "up":
        node.start()
        print(f"node {node.name} Ready on {node.ip}; containerd at {node.containerd_socket}")
    else:
        node.stop()
        print("node down")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main(sys.argv[1:]))
