"""A real, local Kubernetes control plane for tests and the demo.

etcd, kube-apiserver (RBAC on), kube-scheduler and kube-controller-manager (without the node
lifecycle controller, so simulated nodes stay Ready) listen on loopback. State and the admin
kubeconfig live under a directory of the caller's choice (the repo's ignored `.cluster/`).

With `node_address` (`--node-address IP`) the control plane is ready for real kubelets
(hack/realnode.py): the API server binds and advertises that address, so the `kubernetes`
Service's endpoint is reachable from pods, its serving certificate names it, the Node authorizer
is on, it calls kubelets on their InternalIP with a client certificate of its own and checks
their serving certificates against the cluster CA, and the controller manager runs every
controller (the node lifecycle controller lifts the not-ready taint of a Ready kubelet).

    python hack/localcluster.py up [DIR] [--node-address IP]  # start, write DIR/kubeconfig
    python hack/localcluster.py down [DIR]                    # stop and remove the state

Binaries: $KUBEBUILDER_ASSETS first (envtest convention), then the cache filled by
hack/kube-binaries.sh, which builds $KUBE_VERSION (default: the newest release the project pins,
hack/kube-versions.sh) once from Go modules.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
DEFAULT_DIR = REPO / ".cluster"
BINARIES = ("etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager")
ADMIN_TOKEN = "finetune-local-admin"  # static token of the local, loopback-only admin user
SERVICE_CIDR = "10.0.0.0/24"


class ClusterError(RuntimeError):
    pass


def find_binaries() -> dict[str, Path]:
    """Locate the control-plane binaries, building the missing ones into the cache once."""
    found: dict[str, Path] = {}
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        for name in BINARIES:
            if (Path(assets) / name).is_file():
                found[name] = Path(assets) / name
    if len(found) < len(BINARIES):
        result = subprocess.run(
            ["bash", str(HACK / "kube-binaries.sh")], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"cannot provide Kubernetes binaries: {result.stderr.strip()}")
        cache = Path(result.stdout.strip().splitlines()[-1])
        for name in BINARIES:
            found.setdefault(name, cache / name)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(pki: Path, address: str) -> None:
    """A CA, a serving certificate for the API server, and the service-account signing key."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", str(pki / "ca.key"), "2048")
    _openssl(
        "req", "-x509", "-new", "-nodes", "-key", str(pki / "ca.key"), "-days", "30",
        "-subj", "/CN=finetune-local-ca", "-out", str(pki / "ca.crt"),
    )  # fmt: skip
    _openssl("genrsa", "-out", str(pki / "apiserver.key"), "2048")
    _openssl(
        "req", "-new", "-key", str(pki / "apiserver.key"), "-subj", "/CN=kube-apiserver",
        "-out", str(pki / "apiserver.csr"),
    )  # fmt: skip
    (pki / "san.ext").write_text(
        f"subjectAltName=IP:{address},IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
    )
    _openssl(
        "x509", "-req", "-in", str(pki / "apiserver.csr"), "-CA", str(pki / "ca.crt"),
        "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "30",
        "-extfile", str(pki / "san.ext"), "-out", str(pki / "apiserver.crt"),
    )  # fmt: skip
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def issue_certificate(
    pki: Path, name: str, subject: str, *, ip_sans: tuple[str, ...] = (), client: bool = True
) -> tuple[Path, Path]:
    """A key and a certificate signed by the cluster CA in `pki`: a client certificate (the
    subject's CN is the user, each O a group) or, with `client=False`, a serving one for
    `ip_sans`. Returns (certificate, key)."""
    key, csr, crt = pki / f"{name}.key", pki / f"{name}.csr", pki / f"{name}.crt"
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext = pki / f"{name}.ext"
    usage = "clientAuth" if client else "serverAuth"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={usage}"]  # fmt: skip
    if ip_sans:
        lines.append("subjectAltName=" + ",".join(f"IP:{ip}" for ip in ip_sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
        "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip
    return crt, key


@dataclass
class LocalCluster:
    """One local control plane rooted at `root`; with `node_address`, ready for real kubelets
    (see the module's docstring)."""

    root: Path
    node_address: str | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def server(self) -> str:
        return str(json.loads((self.root / "endpoints.json").read_text())["server"])

    def start(self, timeout: float = 120.0) -> LocalCluster:
        if (self.root / "pids").exists():
            raise ClusterError(f"a cluster already runs from {self.root}; run 'down' first")
        bins = find_binaries()
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "logs").mkdir(parents=True)
        pki = self.root / "pki"
        address = self.node_address or "127.0.0.1"
        _make_pki(pki, address)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        server = f"https://{address}:{api_port}"
        (self.root / "endpoints.json").write_text(json.dumps({"server": server}))
        (self.root / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self._write_kubeconfig(server, pki)

        self._spawn("etcd", [
            str(bins["etcd"]), "--data-dir", str(self.root / "etcd"), "--name", "local",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"local=http://127.0.0.1:{peer_port}",
        ])  # fmt: skip
        self._spawn("kube-apiserver", [
            str(bins["kube-apiserver"]),
            "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", address, "--advertise-address", address,
            "--secure-port", str(api_port),
            "--tls-cert-file", str(pki / "apiserver.crt"),
            "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--token-auth-file", str(self.root / "tokens.csv"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--allow-privileged=true",
            *self._node_flags(pki),
        ])  # fmt: skip
        self._wait_ready(server, timeout)
        self._spawn("kube-scheduler", [
            str(bins["kube-scheduler"]), "--kubeconfig", str(self.kubeconfig),
            "--leader-elect=false", "--bind-address", "127.0.0.1",
            "--secure-port", str(free_port()),
        ])  # fmt: skip
        self._spawn("kube-controller-manager", [
            str(bins["kube-controller-manager"]), "--kubeconfig", str(self.kubeconfig),
            "--leader-elect=false", "--bind-address", "127.0.0.1",
            "--secure-port", str(free_port()),
            "--controllers", self._controllers(),
            "--service-account-private-key-file", str(pki / "sa.key"),
            "--root-ca-file", str(pki / "ca.crt"),
            "--use-service-account-credentials=true",
            # Older releases bind a claim to its pre-bound volume only on this periodic sync
            # (default 15 s; 1.34 took 15 to 30 s per namespace of three claims), 1.37 at once.
            "--pvclaimbinder-sync-period=1s",
        ])  # fmt: skip
        self._wait_for_default_service_account(timeout)
        return self

    def _node_flags(self, pki: Path) -> list[str]:
        if self.node_address is None:
            # Loopback cannot be the `kubernetes` Service's endpoint; nothing in-cluster needs it.
            return ["--authorization-mode", "RBAC", "--endpoint-reconciler-type=none"]
        crt, key = issue_certificate(
            pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client"
        )
        return [
            # The Node authorizer lets each kubelet (system:node:NAME) read and write what its
            # node needs; RBAC the rest.
            "--authorization-mode", "Node,RBAC",
            "--kubelet-client-certificate", str(crt), "--kubelet-client-key", str(key),
            "--kubelet-certificate-authority", str(pki / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP",
        ]  # fmt: skip

    def _controllers(self) -> str:
        if self.node_address is None:
            # No kubelets report here: without nodelifecycle the simulated nodes stay Ready.
            return "*,-node-lifecycle-controller,-persistentvolume-attach-detach-controller"
        return "*"

    def client_kubeconfig(self, name: str, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig at DIR/NAME.kubeconfig for `user` in `groups`, with a client
        certificate from the cluster CA (kubelets, kube-proxy)."""
        pki = self.root / "pki"
        subject = "".join(f"/O={group}" for group in groups) + f"/CN={user}"
        crt, key = issue_certificate(pki, name, subject)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": self.server, "certificate-authority": str(pki / "ca.crt")}}],
            "users": [{"name": user, "user": {
                "client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            "current-context": "local",
        }  # fmt: skip
        path = self.root / f"{name}.kubeconfig"
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        """Stop every process of this cluster and remove its state."""
        pid_file = self.root / "pids"
        if pid_file.exists():
            for line in reversed(pid_file.read_text().splitlines()):
                _terminate(int(line.partition(" ")[2]))
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        with open(self.root / "pids", "a") as pids:
            pids.write(f"{name} {proc.pid}\n")

    def _write_kubeconfig(self, server: str, pki: Path) -> None:
        ca = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "local", "cluster": {"server": server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
            "current-context": "local",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    def _request(self, server: str, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.root / "pki" / "ca.crt"))
        req = urllib.request.Request(
            server + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        try:
            with urllib.request.urlopen(req, context=context, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _wait_ready(self, server: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if self._request(server, "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise ClusterError(f"kube-apiserver not ready after {timeout:.0f}s; see {self.root}/logs")

    def _wait_for_default_service_account(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        path = "/api/v1/namespaces/default/serviceaccounts/default"
        while time.monotonic() < deadline:
            self._check_alive()
            if self._request(self.server, path)[0] == 200:
                return
            time.sleep(0.5)
        raise ClusterError(
            f"controller manager made no default service account; see {self.root}/logs"
        )

    def wait_crd_established(self, name: str, timeout: float = 60.0) -> None:
        """Until the CustomResourceDefinition's Established condition is True. (`kubectl wait
        --for=condition=Established` fails at once, "accessor error", when it reads the CRD
        before the API server has written any condition: seen on a loaded machine.)"""
        deadline = time.monotonic() + timeout
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        while time.monotonic() < deadline:
            status, body = self._request(self.server, path)
            if status == 200:
                conditions = json.loads(body).get("status", {}).get("conditions") or []
                if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                    return
            time.sleep(0.2)
        raise ClusterError(f"CRD {name} not Established within {timeout:.0f}s")

    def _check_alive(self) -> None:
        for line in (self.root / "pids").read_text().splitlines():
            name, _, pid = line.partition(" ")
            try:
                finished, _status = os.waitpid(int(pid), os.WNOHANG)
            except ChildProcessError:
                finished = 0 if _pid_alive(int(pid)) else int(pid)
            if finished:
                tail = (self.root / "logs" / f"{name}.log").read_text()[-2000:]
                raise ClusterError(f"{name} exited during start-up:\n{tail}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM a child process, SIGKILL it if it is still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            if not _pid_alive(pid):
                return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    node_address = None
    if "--node-address" in argv[:-1]:
        at = argv.index("--node-address")
        node_address = argv[at + 1]
        argv = argv[:at] + argv[at + 2 :]
    if not argv or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve() if len(argv) > 1 else DEFAULT_DIR
    cluster = LocalCluster(root, node_address=node_address)
    if argv[0] == "up":
        cluster.start()
        print(f"cluster up: export KUBECONFIG={cluster.kubeconfig}")
    else:
        cluster.stop()
        print("cluster down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
