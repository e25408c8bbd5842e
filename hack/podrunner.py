"""Run a pod's container as a local process, the way a kubelet and container runtime would.

`make demo`'s quick path only, a stop-gap: it runs jobs without building the images first. Every
test that runs the trainer in a pod runs the trainer image on a real node instead (tests/e2e,
hack/realnode.py), where the kubelet, containerd and cluster DNS are the real ones.

For the local control plane only (no container engine here): the container's command runs in a
private mount and UTS namespace (`unshare --mount --uts`, so root is needed) where

* the pod's volumes are bind-mounted at their mountPaths: configMap, secret and projected volumes
  as files (the service-account token from the TokenRequest API included), persistentVolumeClaims as the hostPath of their bound
  PersistentVolume, emptyDirs as fresh directories;
* `readOnlyRootFilesystem` makes `/` read-only; `readOnly` mounts are read-only;
* the termination message file is bind-mounted at `terminationMessagePath`;
* the process gets the container's env (`value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`
  to the name, namespace, a label or an annotation: the Job controller gives an Indexed Job's
  container JOB_COMPLETION_INDEX that way) plus KUBERNETES_SERVICE_HOST/PORT pointing at the API
  server;
* the hostname is the pod's `spec.hostname` (else its name), as a kubelet sets it.

The stand-in's DNS: every pod shares the host's network, so every pod's address is 127.0.0.1.
A kubelet writes the pod's /etc/hosts with its own names and cluster DNS resolves the names a
headless Service gives the pods of its `subdomain`; here a per-pod hosts file bind-mounted at
/etc/hosts does both: `<hostname>`, `<hostname>.<subdomain>`, `<hostname>.<subdomain>.<ns>.svc`
and `...svc.cluster.local` for the pod itself and for every pod of the same namespace and
subdomain this runtime runs (rewritten in place whenever one starts, as DNS would follow), all
127.0.0.1. Nothing else: no Service IPs, no other names.

It keeps the invoking user rather than the pod's runAsUser: the interpreter of this checkout's
virtual environment usually lives under a home directory that user cannot enter. The read-only
root filesystem applies to every user, so writes outside the pod's volumes still fail.

Images map to local commands (the image's ENTRYPOINT), e.g. the trainer image to the
`finetune-trainer` console script of this checkout's virtual environment.

Devices are not prepared: a pod with `nvidia.com/gpu` or with a DRA ResourceClaim (allocated by the
scheduler from simulated ResourceSlices) runs without calling a device plugin or a DRA driver's
kubelet plugin; there are no GPUs to hand over here.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

TERMINATION_LIMIT = 4096
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Mount:
    source: Path
    target: str
    read_only: bool
    is_file: bool = False


@dataclass
class LocalRuntime:
    """A container runtime for one cluster: `run(pod)` -> (exit code, termination message)."""

    core: client.CoreV1Api
    images: dict[str, list[str]]
    api_host: str
    api_port: int
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    timeout: float = 600
    _running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _hosts: dict[str, tuple[Any, Path]] = field(default_factory=dict)  # pod uid -> (pod, file)
    # Mountpoints this runtime made on the host, by the number of running pods that use them: a
    # pod's namespace loses its mount when the host's mountpoint is removed.
    _targets: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_trainer(
        cls, core: client.CoreV1Api, server: str, image: str, workdir: Path
    ) -> LocalRuntime:
        """A runtime that runs `image` as this checkout's finetune-trainer console script, for the
        API server at `server` (https://HOST:PORT)."""
        script = shutil.which("finetune-trainer")
        if script is None:
            raise RuntimeError("finetune-trainer is not installed in this environment")
        url = urllib.parse.urlparse(server)
        workdir.mkdir(parents=True, exist_ok=True)
        # This checkout's packages first, as the image would hold them (the virtual environment's
        # editable install may point at another checkout).
        path = os.pathsep.join(str(REPO / folder) for folder in ("api", "trainer"))
        return cls(
            core,
            {image: [script]},
            url.hostname or "127.0.0.1",
            url.port or 443,
            workdir,
            extra_env={"PYTHONPATH": path},
        )

    def __call__(self, pod: Any) -> tuple[int, str]:
        return self.run(pod)

    def run(self, pod: Any) -> tuple[int, str]:
        container = pod.spec.containers[0]
        if container.image not in self.images:
            return 128, f"image {container.image} is not known to the local runtime"
        base = Path(tempfile.mkdtemp(prefix=f"{pod.metadata.name}-", dir=self.workdir))
        base.chmod(0o755)
        mounts = self._mounts(pod, container, base)
        termination = base / "termination-log"
        termination.touch()
        termination.chmod(0o666)
        mounts.append(
            Mount(
                termination,
                container.termination_message_path or "/dev/termination-log",
                False,
                True,
            )
        )
        hosts = base / "hosts"
        mounts.append(Mount(hosts, "/etc/hosts", True, True))
        created = [
            m for m in mounts if m.target.startswith(("/etc/", "/var/run/", "/mnt/", "/dev/"))
        ]
        with self._lock:
            self._hosts[pod.metadata.uid] = (pod, hosts)
            self._write_hosts()
            self._targets.update(m.target for m in created)
        argv = list(container.command or self.images[container.image]) + list(container.args or [])
        env = self._env(pod, container)
        log_path = self.workdir / f"{pod.metadata.namespace}-{pod.metadata.name}.log"
        stage = f"/run/podrunner-{base.name}"  # outside every volume's mount path
        script = self._script(mounts, container, argv, stage, pod_hostname(pod))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            with self._lock:
                self._running[pod.metadata.uid] = proc
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.kill(pod)
                proc.wait()
            finally:
                with self._lock:
                    self._running.pop(pod.metadata.uid, None)
                    self._hosts.pop(pod.metadata.uid, None)
        with self._lock:
            self._targets.subtract(m.target for m in created)
            _cleanup_mountpoints([m for m in created if self._targets[m.target] <= 0])
        shutil.rmtree(stage, ignore_errors=True)  # empty on the host: the mounts were private
        message = termination.read_text(errors="replace")[:TERMINATION_LIMIT]
        if (
            not message.strip()
            and proc.returncode != 0
            and container.termination_message_policy == "FallbackToLogsOnError"
        ):
            lines = log_path.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-TERMINATION_LIMIT:]
        # A container runtime reports death by signal N as exit code 128 + N (SIGKILL: 137).
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        return code, message

    def stop(self, pod: Any, grace: float) -> bool:
        """A graceful deletion, as a kubelet does it: SIGTERM to the pod's container process
        (`unshare` and `sh` exec it, so the pid is the trainer's), SIGKILL after `grace` seconds.
        False when no process of this pod runs here. `run` then returns its exit status."""
        with self._lock:
            proc = self._running.get(pod.metadata.uid)
        if proc is None or proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(pod)
        return True

    def kill(self, pod: Any) -> bool:
        """SIGKILL every process of the pod's container at once, as a runtime kills a container
        (its cgroup), e.g. when its node dies or it runs out of memory: the container's process
        and all its descendants. False when no process of this pod runs here."""
        with self._lock:
            proc = self._running.get(pod.metadata.uid)
        if proc is None or proc.poll() is not None:
            return False
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return True

    def pid(self, pod: Any) -> int | None:
        """The pid of the pod's container process while it runs here."""
        with self._lock:
            proc = self._running.get(pod.metadata.uid)
        return proc.pid if proc is not None and proc.poll() is None else None

    def _write_hosts(self) -> None:
        """Every running pod's hosts file (see the module docstring); under the lock."""
        for pod, path in self._hosts.values():
            lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
            for peer, _ in self._hosts.values():
                if peer is pod or (
                    pod.spec.subdomain
                    and peer.spec.subdomain == pod.spec.subdomain
                    and peer.metadata.namespace == pod.metadata.namespace
                ):
                    lines.append("127.0.0.1\t" + " ".join(_names(peer)))
            text = "\n".join(lines) + "\n"
            with open(path, "r+" if path.exists() else "w") as stream:  # in place: bind-mounted
                stream.write(text)
                stream.truncate()
            path.chmod(0o644)

    def _mounts(self, pod: Any, container: Any, base: Path) -> list[Mount]:
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts = []
        for vm in container.volume_mounts or []:
            volume = volumes[vm.name]
            source = self._materialize(pod, volume, base)
            mounts.append(Mount(source, vm.mount_path, bool(vm.read_only)))
        return mounts

    def _materialize(self, pod: Any, volume: Any, base: Path) -> Path:
        namespace = pod.metadata.namespace
        target: Path = base / "volumes" / str(volume.name)
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o777)
        if volume.config_map is not None:
            data = (
                self.core.read_namespaced_config_map(volume.config_map.name, namespace).data or {}
            )
            for key, value in data.items():
                (target / key).write_text(value)
        elif volume.secret is not None:
            data = self.core.read_namespaced_secret(volume.secret.secret_name, namespace).data or {}
            for key, value in data.items():
                (target / key).write_bytes(base64.b64decode(value))
                (target / key).chmod(0o644)
        elif volume.projected is not None:
            self._project(pod, volume.projected, target)
        elif volume.downward_api is not None:
            for item in volume.downward_api.items or []:
                (target / item.path).write_text(_field(pod, item.field_ref.field_path))
        elif volume.persistent_volume_claim is not None:
            claim = self.core.read_namespaced_persistent_volume_claim(
                volume.persistent_volume_claim.claim_name, namespace
            )
            pv = self.core.read_persistent_volume(claim.spec.volume_name)
            return Path(str(pv.spec.host_path.path))
        elif volume.empty_dir is None:
            raise ValueError(f"volume {volume.name}: type not supported by the local runtime")
        return target

    def _project(self, pod: Any, projected: Any, target: Path) -> None:
        """A projected volume, as the ServiceAccount admission adds it (kube-api-access-*): a
        bound token from the TokenRequest API, the cluster's CA bundle, the namespace."""
        namespace = pod.metadata.namespace
        files: dict[str, bytes] = {}
        for source in projected.sources or []:
            if source.service_account_token is not None:
                request = source.service_account_token
                spec = client.V1TokenRequestSpec(
                    audiences=[request.audience] if request.audience else [],
                    expiration_seconds=request.expiration_seconds,
                    bound_object_ref=client.V1BoundObjectReference(
                        api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                    ),
                )
                token = self.core.create_namespaced_service_account_token(
                    pod.spec.service_account_name or "default",
                    namespace,
                    client.AuthenticationV1TokenRequest(spec=spec),
                )
                files[request.path] = token.status.token.encode()
            elif source.config_map is not None:
                data = self.core.read_namespaced_config_map(source.config_map.name, namespace).data
                for item in source.config_map.items or []:
                    files[item.path] = (data or {})[item.key].encode()
            elif source.downward_api is not None:
                for item in source.downward_api.items or []:
                    files[item.path] = _field(pod, item.field_ref.field_path).encode()
        for path, content in files.items():
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            (target / path).write_bytes(content)
            (target / path).chmod(0o644)

    def _env(self, pod: Any, container: Any) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/tmp",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            **self.extra_env,
        }
        namespace = pod.metadata.namespace
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = var.value
            elif var.value_from is not None and var.value_from.secret_key_ref is not None:
                ref = var.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, namespace)
                env[var.name] = base64.b64decode(secret.data[ref.key]).decode()
            elif var.value_from is not None and var.value_from.config_map_key_ref is not None:
                ref = var.value_from.config_map_key_ref
                env[var.name] = self.core.read_namespaced_config_map(ref.name, namespace).data[
                    ref.key
                ]
            elif var.value_from is not None and var.value_from.field_ref is not None:
                env[var.name] = _field(pod, var.value_from.field_ref.field_path)
        return env

    def _script(
        self, mounts: list[Mount], container: Any, argv: list[str], stage: str, hostname: str
    ) -> str:
        """The shell script run inside the new mount namespace.

        A volume mounted over a directory that holds host paths the process still needs (an
        emptyDir at /tmp while this checkout, its virtual environment or the volume sources live
        under /tmp) would hide them: such paths are first bind-mounted to a staging directory,
        then put back at their own path inside the new mount."""
        targets = [m.target for m in mounts if not m.is_file and m.target != "/"]
        wanted = {str(m.source) for m in mounts if not m.is_file} | {
            sys.prefix,
            str(REPO),
            str(self.workdir),
        }
        keep = [
            k
            for k in sorted(wanted)
            if not any(k != o and Path(k).is_relative_to(o) for o in wanted)
        ]
        covered = [k for k in keep if any(Path(k).is_relative_to(t) for t in targets)]
        lines = ["set -e"]
        if covered:
            lines.append(f"mkdir -p {stage}")
        for index, path in enumerate(covered):
            lines += [
                f"mkdir -p {stage}/{index}",
                f"mount --bind {shlex.quote(path)} {stage}/{index}",
            ]

        def source(path: Path) -> str:
            for index, kept in enumerate(covered):
                if path.is_relative_to(kept):
                    return f"{stage}/{index}/{path.relative_to(kept)}"
            return str(path)

        for m in sorted(mounts, key=lambda m: m.target.count("/")):
            target = shlex.quote(m.target)
            lines.append(
                f"[ -e {target} ] || touch {target}" if m.is_file else f"mkdir -p {target}"
            )
            lines.append(f"mount --bind {shlex.quote(source(Path(m.source)))} {target}")
            if m.read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        for index, path in enumerate(covered):
            lines += [
                f"mkdir -p {shlex.quote(path)}",
                f"mount --bind {stage}/{index} {shlex.quote(path)}",
            ]
        lines.append(f"hostname {shlex.quote(hostname)}")
        sc = container.security_context
        if sc is not None and sc.read_only_root_filesystem:
            lines.append("mount -o remount,bind,ro /")
        lines.append(f"exec {shlex.join(argv)}")
        return "\n".join(lines)


def pod_hostname(pod: Any) -> str:
    return str(pod.spec.hostname or pod.metadata.name)


def _names(pod: Any) -> list[str]:
    """The names a pod answers to: its hostname and, with a subdomain, the headless Service's."""
    host = pod_hostname(pod)
    sub = pod.spec.subdomain
    if not sub:
        return [host]
    ns = pod.metadata.namespace
    return [f"{host}.{sub}.{ns}.svc.cluster.local", f"{host}.{sub}.{ns}.svc", f"{host}.{sub}", host]


def _field(pod: Any, path: str) -> str:
    """A downward-API fieldRef of the pod: name, namespace, a label or an annotation."""
    simple = {"metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace}
    if path in simple:
        return str(simple[path])
    for prefix, found in (
        ("metadata.labels", pod.metadata.labels),
        ("metadata.annotations", pod.metadata.annotations),
    ):
        if path.startswith(f"{prefix}['") and path.endswith("']"):
            return str((found or {}).get(path[len(prefix) + 2 : -2], ""))
    raise ValueError(f"fieldRef {path}: not supported by the local runtime")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found through /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cleanup_mountpoints(mounts: list[Mount]) -> None:
    """Remove the empty mountpoints created on the host for targets outside the workdir."""
    for m in sorted(mounts, key=lambda m: -m.target.count("/")):
        path = Path(m.target)
        try:
            if m.is_file and path.is_file() and path.stat().st_size == 0:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
                for parent in path.parents:
                    if str(parent) in ("/", "/etc", "/var", "/var/run", "/mnt", "/dev", "/run"):
                        break
                    if any(parent.iterdir()):
                        break
                    parent.rmdir()
        except OSError:
            continue
